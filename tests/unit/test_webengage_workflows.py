"""The ten WebEngage workflows of seeds/004, each simulated over a scripted timeline."""

from __future__ import annotations

from nudgeflow.engine.io import CallRequest, CallResult, Event, ProfileUpdate
from nudgeflow.engine.loader import load_journeys
from nudgeflow.engine.simulate import Simulator
from tests.unit.journeys import ROOT, T0, D, H, M

WF = ROOT / "journeys" / "seeds" / "webengage-workflows"


def sim(*files: str) -> Simulator:
    return Simulator(load_journeys([ROOT / "journeys" / "seeds" / "segments.yaml", *(WF / f for f in files)]))


def sends(s: Simulator, user: str | None = None) -> list[tuple[int, str, str]]:
    return [(r.created_at - T0, r.channel, r.step) for r in s.sends if user is None or r.user_id == user]


def answer_calls(s: Simulator, body: object, after: int = 1000) -> None:
    """Answer every open API call like the call runner would, `after` ms after it was made."""
    done = {fx.key for _, fx in s.log if isinstance(fx, CallResult)}
    for _, fx in list(s.log):
        if isinstance(fx, CallRequest) and fx.key not in done:
            s.feed(CallResult(fx.user_id, fx.key, True, body), at=fx.created_at + after)


def test_01_app_downloads() -> None:
    s = sim("01-app-downloads.yaml")
    s.feed(ProfileUpdate("has-app", T0 - D, {"reachable_push": True}))
    s.feed(ProfileUpdate("web-only", T0 - D, {"reachable_push": False}))
    s.feed(ProfileUpdate("late", T0 - D, {"reachable_push": False}))
    s.feed(Event("has-app", "checkout_completed", T0, {"platform": "web"}))
    s.feed(Event("web-only", "checkout_completed", T0, {"platform": "web"}))
    s.feed(Event("late", "checkout_completed", T0, {"platform": "web"}))
    s.feed(Event("late", "app_downloaded", T0 + D + 30 * M))  # downloads after the first SMS
    s.run_until(T0 + 10 * D)
    assert sends(s, "has-app") == []
    assert sends(s, "late") == [(D, "sms", "sms_app_offer")]
    assert sends(s, "web-only") == [
        (D, "sms", "sms_app_offer"),
        (D + H, "email", "email_app_offer"),
        (2 * D + H, "sms", "final_sms"),
    ]


def test_02_cart_abandonment() -> None:
    s = sim("02-cart-abandonment.yaml")
    s.feed(ProfileUpdate("pushable", T0 - D, {"cart_items": 2}))
    s.feed(ProfileUpdate("email-only", T0 - D, {"cart_items": 1, "reachable_push": False}))
    s.feed(ProfileUpdate("emptied", T0 - D, {"cart_items": 0}))
    for u in ("pushable", "email-only", "emptied", "buyer"):
        s.feed(Event(u, "add_to_cart", T0, {"product": "Kettle", "category": "Kitchen"}))
    s.feed(Event("buyer", "charged", T0 + H))
    s.run_until(T0 + D)
    assert sends(s, "pushable") == [(2 * H, "push", "push_reminder"), (2 * H, "email", "email_with_similar")]
    assert sends(s, "email-only") == [(2 * H, "email", "email_with_similar")]
    assert sends(s, "emptied") == [] and sends(s, "buyer") == []
    (email,) = [r for r in s.sends if r.user_id == "pushable" and r.channel == "email"]
    assert "Kitchen" in email.content["subject"]
    assert len(s.counts("converted")) == 1


def test_03_window_shoppers() -> None:
    s = sim("03-window-shoppers.yaml")
    s.feed(ProfileUpdate("app-user", T0 - D, {"reachable_push": True}))
    s.feed(ProfileUpdate("web-user", T0 - D, {"reachable_push": False}))
    for u in ("app-user", "web-user", "once"):
        for i in range(3 if u != "once" else 0):
            s.feed(Event(u, "page_viewed", T0 - (5 - i) * M, {"page_type": "blog"}))
        s.feed(Event(u, "page_viewed", T0, {"page_type": "product", "known_user": True}))
    s.run_until(T0 + 60 * M + 1)  # the history API is called when the 60 minutes are over
    answer_calls(s, {"last_viewed": "Trail sneakers"})
    s.feed(Event("app-user", "charged", T0 + 80 * M))
    s.run_until(T0 + 3 * D)
    assert sends(s, "once") == []  # not a repeat browser
    assert sends(s, "app-user") == [(60 * M + 1000, "push", "push_offer"), (80 * M, "email", "thank_you_email")]
    assert sends(s, "web-user") == [
        (60 * M + 1000, "inapp", "onsite_offer"),
        (90 * M + 1000, "email", "email_recommendations"),
        (90 * M + 1000 + 12 * H, "sms", "sms_discount"),
    ]
    assert s.sends[0].content["title"] == "A limited discount on Trail sneakers"


def test_04_engagement_score() -> None:
    s = sim("04-engagement-score.yaml", "04-engagement-score-negative.yaml", "04-engagement-score-inactivity.yaml")
    s.feed(Event("u", "form_submitted", T0))
    s.feed(Event("u", "email_clicked", T0 + H))
    s.feed(Event("u", "push_dismissed", T0 + 2 * H))
    s.feed(ProfileUpdate("u", T0 + 30 * D, {"inactivity_segment": "D-30"}))
    s.feed(ProfileUpdate("u", T0 + 60 * D, {"inactivity_segment": "D-60"}))
    assert s.states["u"]["profile"]["lead_score"] == 10 + 10 - 10 - 50 - 50
    s.feed(ProfileUpdate("u", T0 + 61 * D, {"inactivity_segment": None}))  # active again: no change
    assert s.states["u"]["profile"]["lead_score"] == -90


def test_05_reactivate_cold_users() -> None:
    s = sim("05-reactivate-cold-users.yaml")
    s.feed(ProfileUpdate("wp", T0, {"reachable_webpush": True, "inactivity_segment": "D-30"}))
    s.feed(ProfileUpdate("mail", T0, {"reachable_webpush": False, "lead_score": -150}))
    s.feed(Event("wp", "login", T0 + D))
    s.run_until(T0 + 5 * D)
    assert sends(s, "wp") == [(0, "webpush", "webpush_comeback")]
    assert s.states["wp"]["profile"]["lead_score"] == 10
    assert sends(s, "mail") == [(0, "email", "email_comeback"), (2 * D, "email", "latest_content")]


def test_06_trial_to_paid() -> None:
    s = sim("06-trial-to-paid.yaml")
    for u in ("self-serve", "idle", "engaged"):
        s.feed(Event(u, "trial_started", T0))
    s.feed(Event("self-serve", "subscription_paid", T0 + 3 * D))
    for i in range(3):
        s.feed(Event("engaged", "lesson_completed", T0 + (2 + i) * D))
    s.feed(Event("engaged", "add_to_cart", T0 + 6 * D, {"course": "Python"}))
    s.feed(ProfileUpdate("engaged", T0, {"reachable_webpush": True}))
    s.run_until(T0 + 20 * D)
    assert sends(s, "self-serve") == [] and sends(s, "idle") == []
    assert sends(s, "engaged") == [(7 * D, "webpush", "webpush_premium"), (9 * D, "email", "email_cart_courses")]
    assert [c.journey for c in s.counts("converted")] == ["we-06-trial-to-paid"]  # self-serve only


def test_07_emi_reminders() -> None:
    s = sim("07-emi-reminders.yaml")
    due = "2026-02-01"  # T0 is 2026-01-01
    s.feed(ProfileUpdate("payer", T0, {"emi_due_date": due, "emi_amount": "INR 12,000"}))
    s.feed(ProfileUpdate("late", T0, {"emi_due_date": due, "emi_amount": "INR 9,000"}))
    s.feed(Event("payer", "emi_paid", T0 + 23 * D))  # pays between the D-10 and D-5 reminders
    s.run_until(T0 + 40 * D)
    d10, d5 = 21 * D, 26 * D  # 2026-01-22 and 2026-01-27
    assert sends(s, "payer") == [(d10, "email", "email_d10")]
    assert s.states["payer"]["profile"]["emi_due_date"] == "2026-03-03"  # next cycle, +30 days
    assert sends(s, "late") == [(d10, "email", "email_d10"), (d5, "email", "email_d5"), (d5, "sms", "sms_d5")]
    (first,) = [r for r in s.sends if r.user_id == "payer"]
    assert first.content["subject"] == "Your EMI of INR 12,000 is due on 2026-02-01"
    # the next cycle's D-10 reminder for the payer, unless paid again
    s.run_until(T0 + 55 * D)
    assert sends(s, "payer")[-1] == (51 * D, "email", "email_d10")


def test_08_weekly_progress_report() -> None:
    s = sim("08-weekly-progress-report.yaml")
    s.feed(Event("stu", "course_started", T0, {"course_id": "c1", "course_name": "Algebra"}))
    for day in (1, 3):
        s.feed(Event("stu", "lesson_completed", T0 + day * D))
    s.run_until(T0 + 7 * D + 1)
    answer_calls(s, {"percent": 20, "hours": 3, "forum_url": "https://f/1"})
    s.feed(Event("stu", "lesson_completed", T0 + 9 * D))
    s.run_until(T0 + 14 * D + 1001)  # a week after the first reports
    answer_calls(s, {"percent": 45, "hours": 4, "forum_url": "https://f/1"})
    s.run_until(T0 + 30 * D)  # no lesson in week 3: inactive, leaves
    assert sends(s) == [
        (7 * D + 1000, "sms", "sms_report"),
        (7 * D + 1000, "email", "email_report"),
        (14 * D + 2000, "sms", "sms_report"),
        (14 * D + 2000, "email", "email_report"),
    ]
    assert s.sends[2].content["text"] == "Algebra: 45% done, 4 h this week."
    assert [c.detail for c in s.counts("exited")] == ["completed"]


def test_09_course_recommendations() -> None:
    s = sim("09-course-recommendations.yaml")
    s.feed(ProfileUpdate("browser", T0, {"reachable_webpush": True}))
    for u in ("browser", "converter"):
        s.feed(Event(u, "course_completed", T0, {"course_id": "c1", "course_name": "Algebra"}))
    answer_calls(s, {"certificate_url": "https://c/1", "items": [{"name": "Geometry"}]})
    s.feed(Event("converter", "recommendation_viewed", T0 + 3 * D))
    s.feed(Event("converter", "course_started", T0 + 4 * D))
    s.run_until(T0 + 20 * D)
    assert sends(s, "converter") == [
        (1000, "email", "congratulations_email"),
        (2 * D + 1000, "email", "feedback_email"),
    ]
    assert sends(s, "browser") == [
        (1000, "email", "congratulations_email"),
        (2 * D + 1000, "email", "feedback_email"),
        (7 * D + 1000, "webpush", "recommendations_webpush"),
    ]
    assert s.sends[0].content["subject"] == "Congratulations on completing Algebra!"
    assert len(s.counts("converted")) == 1


def test_10_churn_prevention_uses_the_first_reachable_channel() -> None:
    s = sim("10-churn-prevention.yaml")
    s.feed(ProfileUpdate("mail", T0, {"churn_risk": "high"}))
    s.feed(ProfileUpdate("sms-only", T0, {"reachable_email": False, "reachable_push": False, "churn_risk": "high"}))
    s.feed(
        ProfileUpdate(
            "nobody",
            T0,
            {**{f"reachable_{c}": False for c in ("email", "push", "sms", "whatsapp")}, "churn_risk": "high"},
        )
    )
    s.feed(Event("mail", "login", T0 + 5 * H))
    s.run_until(T0 + 3 * D)
    assert sends(s, "mail") == [(0, "email", "update_notes"), (5 * H, "email", "welcome_back")]
    assert sends(s, "sms-only") == [(0, "sms", "update_notes"), (D, "sms", "ask_feedback")]
    assert sends(s, "nobody") == []
    assert [c.detail for c in s.counts("unreachable")] == ["update_notes", "ask_feedback"]
