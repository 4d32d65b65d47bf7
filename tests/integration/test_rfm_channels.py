"""The WebEngage RFM flow end to end on real parts: worker -> call runner (recommendations from a
local API) -> email sender (SMTP to aiosmtpd, which hard-bounces the address) -> feedback and
the SMS fallback -> SMS sender (the Twilio Messages API shape, answering 503 first, then 201):
the user gets exactly one SMS, personalised from the API's answer. A second user's SMS is
refused for good (400): it lands in the send dead-letter topic."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import orjson
import pytest
from aiosmtpd.controller import Controller

from nudgeflow.broker import EmbeddedBroker, die_with_parent, free_port
from tests.apis import ApiHandler, start
from tests.integration.conftest import Client, new_worker, wait_for
from tests.unit.journeys import ROOT

pytestmark = pytest.mark.integration
SECRET = "rfm-secret"


class Api(ApiHandler):
    """The recommendation engine and the SMS gateway on one local server."""

    sms: ClassVar[list[dict[str, list[str]]]] = []
    sms_answers: ClassVar[list[int]] = [503]  # the gateway's first answer: busy

    def do_GET(self) -> None:
        url = urlparse(self.path)
        category = parse_qs(url.query).get("category", ["?"])[0]
        self.answer(200, {"items": [{"name": f"{category} Plus", "url": "https://shop.example/p/1"}]})

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["content-length"])).decode())
        if form["To"][0] == "+15550002":
            self.answer(400, {"code": 21604, "message": "refused"})
            return
        status = Api.sms_answers.pop(0) if Api.sms_answers else 201
        if status == 201:
            Api.sms.append(form)
        self.answer(status, {"sid": f"SM{len(Api.sms)}"} if status == 201 else {"message": "busy"})


class BouncingMailbox:
    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        return "550 5.1.1 mailbox unavailable"


@pytest.fixture()
def api() -> Iterator[str]:
    base, stop = start(Api)
    yield base
    stop()


def test_bounced_email_falls_back_to_exactly_one_sms(broker: EmbeddedBroker, tmp_path: Path, api: str) -> None:
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    (journeys / "segments.yaml").write_text((ROOT / "journeys" / "seeds" / "segments.yaml").read_text())
    rfm = (ROOT / "journeys" / "seeds" / "webengage-rfm-one-time-buyers.yaml").read_text()
    (journeys / "rfm.yaml").write_text(rfm.replace("https://recs.example.com", api))
    smtp_port = free_port()
    mail = Controller(BouncingMailbox(), hostname="127.0.0.1", port=smtp_port)
    mail.start()
    w = new_worker(broker, tmp_path, journeys)
    w.extra_env = {"NUDGEFLOW_TOPIC_SECRET": SECRET}
    w.start()
    env = {**w.env(), "NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS": "127.0.0.1/32"}
    parts = {
        "calls": ([], {}),
        "email": (
            ["send", "--channel", "email", "--provider", "smtp"],
            {
                "NUDGEFLOW_SMTP_HOST": "127.0.0.1",
                "NUDGEFLOW_SMTP_PORT": str(smtp_port),
                "NUDGEFLOW_SMTP_SENDER": "shop@example.com",
                "NUDGEFLOW_SMTP_STARTTLS": "false",
            },
        ),
        "sms": (
            ["send", "--channel", "sms", "--provider", "twilio"],
            {
                "NUDGEFLOW_TWILIO_ACCOUNT_SID": "AC1",
                "NUDGEFLOW_TWILIO_AUTH_TOKEN": "t",
                "NUDGEFLOW_TWILIO_FROM_NUMBER": "+15550000",
                "NUDGEFLOW_TWILIO_BASE_URL": api,
            },
        ),
    }
    procs = []
    for name, (args, extra) in parts.items():
        cmd = [sys.executable, "-m", "nudgeflow.cli", *(args or ["calls"])]
        procs.append(
            subprocess.Popen(
                cmd,
                env={**env, **extra, "NUDGEFLOW_DATA_DIR": str(tmp_path / f"data-{name}")},
                stdout=open(tmp_path / f"{name}.out", "wb"),  # noqa: SIM115 - the child keeps it
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        )
    client = Client(broker, w.topics)
    try:
        now = int(time.time() * 1000)
        for user, phone in (("priya", "+15550001"), ("ravi", "+15550002")):
            client.produce(
                "user_profiles",
                user,
                {
                    "user_id": user,
                    "ts": now - 3000,
                    "attributes": {"first_name": user.title(), "email": f"{user}@example.com", "phone": phone},
                },
            )
            client.produce(
                "page_viewed", user, {"user_id": user, "ts": now - 2000, "props": {"page_category": "Insurance"}}
            )
            client.produce("charged", user, {"user_id": user, "ts": now - 1000, "props": {"amount": 1200}})
        assert wait_for(lambda: len(Api.sms) == 1, timeout=120), [p.read_text() for p in tmp_path.glob("*.out")]
        (form,) = Api.sms
        assert form["To"] == ["+15550001"] and form["From"] == ["+15550000"]
        assert form["Body"] == ["Priya, we picked Insurance Plus for you. Details: https://shop.example/p/1"]
        dead = client.read(client.topics.send_dead_letter, min_count=1, timeout=60)
        assert [(m.key(), dict(m.headers())["reason"]) for m in dead] == [(b"ravi", b"permanent")]
        feedback = [orjson.loads(m.value()) for m in client.read(client.topics.feedback, min_count=2)]
        unreachable = sorted(f["user_id"] for f in feedback if f.get("status") == "unreachable")
        assert unreachable == ["priya", "ravi"]  # both email addresses bounced
        time.sleep(3)  # nothing more arrives (absence: nothing to wait for)
        assert len(Api.sms) == 1
        statuses = {"delivered": 1, "failed": 1, "unreachable": 2}  # priya's SMS; ravi's SMS; both emails
        for status, n in statuses.items():
            assert wait_for(lambda s=status, k=n: w.metric("nudgeflow_delivery_feedback_total", status=s) == k)
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)
        w.stop()
        mail.stop()
