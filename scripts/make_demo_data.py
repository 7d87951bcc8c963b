"""Write the bundled demo dataset `demo:support` (and its held-out split `demo:support-eval`), and the same
questions as preference pairs for DPO / ORPO (`demo:support-pairs`, `demo:support-pairs-eval`).

A customer-support assistant that always answers in a fixed two-line format:

    Category: <account|billing|shipping|technical>
    Answer: <one or two sentences>

The 135M base model never produces this format, so a short CPU fine-tune visibly changes its
behaviour, and `ft_magics.demo_task.score` can grade held-out answers (format and category).
Deterministic: re-running writes the same files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "ft_magics" / "data"

PRODUCTS = ["the Aero headphones", "my Nimbus router", "the Pixel Pro stand", "the Orbit smartwatch",
            "my Lumen desk lamp", "the Kettle One", "the Trail backpack", "my Vega speaker",
            "the Atlas keyboard", "the Solo blender", "my Drift e-reader", "the Nova webcam"]
PLANS = ["Basic", "Plus", "Premium", "Family", "Student", "Business"]
DAYS = ["two days", "a week", "ten days", "three weeks", "five days", "a month"]
DEVICES = ["iPhone", "Android phone", "Windows laptop", "Mac", "tablet", "Chromebook"]

QUESTIONS = {
    "account": [
        ("How do I reset my password?", "Click 'Forgot password' on the sign-in page and follow the link we email you; it is valid for 30 minutes."),
        ("I forgot my password and can't log in.", "Use 'Forgot password' on the sign-in page; we will email you a reset link that works for 30 minutes."),
        ("How can I change the email address on my account?", "Go to Settings > Profile, enter the new address and confirm it from the message we send there."),
        ("Can I change my username?", "Yes: open Settings > Profile and edit your username; it can be changed once every 30 days."),
        ("How do I delete my account?", "Open Settings > Privacy and choose 'Delete account'; your data is removed within 14 days."),
        ("My account is locked after too many login attempts.", "Wait 15 minutes for the lock to lift, then sign in or reset your password from the sign-in page."),
        ("How do I turn on two-factor authentication?", "Go to Settings > Security, choose 'Two-factor authentication' and scan the code with an authenticator app."),
        ("I never received the verification email.", "Check your spam folder, then use 'Resend verification' on the sign-in page; it arrives within five minutes."),
        ("How do I sign out of all devices on my {device}?", "Open Settings > Security on your {device} and tap 'Sign out everywhere'; every session ends at once."),
        ("Someone else may be using my account.", "Reset your password now and choose 'Sign out everywhere' in Settings > Security; we will review recent activity."),
        ("How do I update my phone number?", "Open Settings > Profile, enter the new number and type in the code we text you to confirm it."),
        ("Can two people share one account?", "Each account is for one person; the {plan} plan can add family members with their own logins."),
    ],
    "billing": [
        ("Why was I charged twice this month?", "A double charge is usually a pending authorisation that drops off in 3-5 days; if both stay, we refund one."),
        ("How do I get a refund for {product}?", "Request a refund under Orders > {product} within 30 days of delivery; the money returns to your card in 5-7 days."),
        ("How can I cancel my {plan} subscription?", "Go to Settings > Billing and choose 'Cancel {plan}'; you keep access until the end of the paid period."),
        ("Can I switch from the {plan} plan to a cheaper one?", "Yes: pick a new plan under Settings > Billing; the change applies at your next renewal date."),
        ("My card was declined when I tried to pay.", "Check the card's expiry date and billing address, or add another card under Settings > Billing and retry."),
        ("Where can I download my invoices?", "All invoices are under Settings > Billing > Invoices, where each one can be downloaded as a PDF."),
        ("Do you offer a student discount?", "Yes: the Student plan costs half of Plus; verify your school email under Settings > Billing to switch."),
        ("How do I update my payment method?", "Open Settings > Billing > Payment methods, add the new card and mark it as the default."),
        ("I was charged after I cancelled my {plan} plan.", "If the charge came after the cancellation date we refund it in full; reply with the date and we will check it."),
        ("When will I be billed for the {plan} plan?", "The {plan} plan renews on the same day each month; the date is shown under Settings > Billing."),
        ("Can I pay once a year instead of monthly?", "Yes: choose annual billing under Settings > Billing and save two months compared with paying monthly."),
        ("Is there a fee to cancel?", "No, cancelling is free at any time; you keep access until the end of the period you paid for."),
    ],
    "shipping": [
        ("Where is my order? It has been {days}.", "Open Orders and tap 'Track package' for the live status; if it has not moved in {days}, we send a replacement."),
        ("How long does delivery take for {product}?", "Standard delivery of {product} takes 3-5 working days and express takes 1-2; both show a date at checkout."),
        ("Can I change the delivery address after ordering?", "Yes, until the order ships: open Orders, choose the order and edit the address."),
        ("My package arrived damaged.", "Sorry about that: send a photo under Orders > 'Report a problem' and we ship a replacement at no cost."),
        ("Do you ship internationally?", "We ship to over 40 countries; the cost and delivery time for yours appear at checkout."),
        ("The tracking number for {product} does not work.", "Tracking numbers become active within 24 hours of dispatch; if it still fails after that, tell us the order number."),
        ("Can I pick up {product} from a store?", "Yes: choose 'Click and collect' at checkout and we will email you when {product} is ready to pick up."),
        ("My order says delivered but I don't have it.", "Check with neighbours and your building's reception; if it has not turned up within 48 hours, we open an investigation."),
        ("How do I return {product}?", "Start a return under Orders > {product}; print the free label and drop the parcel at any post office within 30 days."),
        ("Is express shipping available?", "Yes: express delivery takes 1-2 working days and is offered at checkout for most addresses."),
        ("Part of my order is missing.", "Items can ship separately; check Orders for a second tracking number, or tell us which item is missing."),
        ("Can I send {product} as a gift?", "Yes: tick 'This is a gift' at checkout to add a message and hide the prices on the packing slip."),
    ],
    "technical": [
        ("{product} won't turn on.", "Charge {product} for at least 30 minutes, then hold the power button for 10 seconds to restart it."),
        ("The app keeps crashing on my {device}.", "Update the app to the latest version and restart your {device}; if it still crashes, reinstall the app."),
        ("How do I connect {product} to Wi-Fi?", "Open the app, tap Devices > {product} > Wi-Fi and choose your network; use the 2.4 GHz band if 5 GHz fails."),
        ("Bluetooth pairing with {product} fails.", "Turn Bluetooth off and on, forget {product} in your Bluetooth list, then hold its button for 5 seconds to pair again."),
        ("How do I update the firmware on {product}?", "Keep {product} charged and connected, then open the app and tap Devices > {product} > Update firmware."),
        ("The app is very slow on my {device}.", "Clear the app cache in Settings > Storage and close other apps; a restart of your {device} also helps."),
        ("{product} keeps disconnecting.", "Move {product} closer to the router and update its firmware in the app; interference from other devices can cause drops."),
        ("How do I factory reset {product}?", "Hold the reset button on {product} for 15 seconds until the light blinks; it then restarts with factory settings."),
        ("I get an error code E42.", "E42 means the device lost its connection to our servers; restart it and check that your internet works."),
        ("Notifications are not showing on my {device}.", "Allow notifications for the app in your {device}'s settings and turn off battery saving for it."),
        ("The battery of {product} drains quickly.", "Update {product} to the latest firmware and lower the screen brightness; a full charge cycle recalibrates the battery."),
        ("How do I install the app on my {device}?", "Download it from your {device}'s app store, open it and sign in with your account email."),
    ],
}

OPENERS = ["", "Hi, ", "Hello! ", "Hey, ", "Good morning. ", "Quick question: ", "Please help. ", "Hi there, "]
CLOSERS = ["", "", " Thanks!", " Thank you.", " Any ideas?", " Please advise."]


def fill(template: str, rng: random.Random, slots: dict) -> str:  # noqa: ARG001
    return template.format(**slots)


def make(seed: int = 7):
    rng = random.Random(seed)
    train, held = [], []
    for cat, pairs in QUESTIONS.items():
        for qi, (q, a) in enumerate(pairs):
            seen = set()
            variants = []
            for _ in range(60):
                slots = {"product": rng.choice(PRODUCTS), "plan": rng.choice(PLANS), "days": rng.choice(DAYS),
                         "device": rng.choice(DEVICES)}
                opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
                body = fill(q, rng, slots)
                if opener and not body.startswith(("I ", "I'")):
                    body = body[0].lower() + body[1:]
                question = opener + body + closer
                if question in seen:
                    continue
                seen.add(question)
                answer = f"Category: {cat}\nAnswer: {fill(a, rng, slots)}"
                variants.append({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]})
                if len(variants) == 8:
                    break
            # Question templates 0 and 6 of each category are held out entirely (unseen phrasings);
            # the rest give 6 training variants and 1 held-out variant each.
            if qi in (0, 6):
                held += variants[:4]
            else:
                train += variants[:6]
                held += variants[6:7]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


VAGUE = "Please contact our support team; they will look into it for you."


def as_pairs(rows: list, seed: int) -> list:
    """Each example as a preference pair: its answer preferred to a worse one, in turn one with the wrong
    category, one without the two-line format, and one that helps nobody."""
    rng = random.Random(seed)
    pairs = []
    for i, r in enumerate(rows):
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        cat_line, answer_line = answer.split("\n", 1)
        cat = cat_line.split(": ", 1)[1]
        kind = i % 3
        if kind == 0:
            other = rng.choice([c for c in QUESTIONS if c != cat])
            rejected = f"Category: {other}\n{answer_line}"
        elif kind == 1:
            rejected = answer_line.split(": ", 1)[1]
        else:
            rejected = f"{cat_line}\nAnswer: {VAGUE}"
        pairs.append({"prompt": question, "chosen": answer, "rejected": rejected})
    return pairs


def main() -> None:
    train, held = make()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("support", train), ("support-eval", held), ("support-pairs", as_pairs(train, 1)),
                       ("support-pairs-eval", as_pairs(held, 2))):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {OUT / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
