"""The `nudgeflow` command line.

nudgeflow demo        embedded broker + worker + demo traffic + console sender, with metrics
nudgeflow run         a journey worker (--broker kafka://host:9092, or --broker embedded)
nudgeflow send        a sender for one channel topic (console provider, ...)
nudgeflow validate    check journey files; errors name file, line and what is wrong
nudgeflow schema      print the JSON Schema of journey files (for editors)
nudgeflow release     release quarantined users after a fix
nudgeflow stats       per journey and step: entered, in it now, exited, converted, sends, feedback
nudgeflow graph       a journey as a picture (Mermaid, DOT, SVG, PNG) with its counts
nudgeflow inspect     one user's journeys, steps, wake-ups, entries and recent sends, and why
nudgeflow compile     compile the hot modules (Cython; optional: without them, the same from source)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from nudgeflow.channels.providers import PROVIDERS
from nudgeflow.engine.errors import ConfigError, JourneyFileErrors, NudgeflowError
from nudgeflow.engine.schema import CHANNELS
from nudgeflow.settings import Settings

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

Broker = Annotated[str | None, typer.Option(help="kafka://host:9092 or 'embedded' [env NUDGEFLOW_BROKER]")]
JourneyPaths = Annotated[
    list[Path] | None, typer.Option("--journeys", "-j", help="journey file or directory (repeatable)")
]


def remote_settings(what: str, **overrides: Any) -> Settings:
    """Settings of a command that talks to the workers' broker (never an embedded one)."""
    s = settings(**overrides)
    if s.broker is None or s.broker == "embedded":
        typer.echo(f"{what} needs --broker kafka://host:port (the worker's broker)", err=True)
        raise typer.Exit(2)
    return s


def settings(**overrides: Any) -> Settings:
    """Environment first, then the flags that were given. Unknown NUDGEFLOW_* variables (a typo
    would silently leave the default in force) are warned about."""
    _warn_unknown_env()
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        for err in e.errors():
            typer.echo(f"configuration error: {'.'.join(map(str, err['loc']))}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


def signer(s: Settings) -> Any:
    """The internal topics' signer of these settings (README "Security model")."""
    from nudgeflow.streams.wire import Signer

    return Signer(s.topic_secret.get_secret_value() if s.topic_secret else None)


def channel_metrics(s: Settings) -> None:
    """Serve a sender's or the call runner's /metrics when NUDGEFLOW_CHANNEL_METRICS_PORT is set."""
    if s.channel_metrics_port is None:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(s.channel_metrics_port, s.metrics_host)
    except OSError as e:
        typer.echo(f"metrics port {s.channel_metrics_port}: {e.strerror}", err=True)
        raise typer.Exit(2) from None


def _warn_unknown_env() -> None:
    import os

    known = {f"NUDGEFLOW_{name.upper()}" for name in Settings.model_fields}
    prefixes = [
        str(reg.settings.model_config.get("env_prefix", "")).upper()
        for reg in PROVIDERS.values()
        if reg.settings is not None
    ]
    for var in sorted(os.environ):
        if var.startswith("NUDGEFLOW_") and var not in known and not any(p and var.startswith(p) for p in prefixes):
            typer.echo(f"warning: {var} is not a nudgeflow setting (README 'Configuration'): ignored", err=True)


@app.command()
def run(
    broker: Broker = None,
    journeys: JourneyPaths = None,
    app_id: Annotated[str | None, typer.Option(help="consumer group / state prefix")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="RocksDB state directory")] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="prefix of every topic")] = None,
    partitions: Annotated[int | None, typer.Option(help="partitions of created topics")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0: any free)")] = None,
    log_level: Annotated[str | None, typer.Option(help="info or debug")] = None,
    log_file: Annotated[Path | None, typer.Option(help="write the worker log here")] = None,
) -> None:
    """Run a journey worker: consume events, keep state, fire timers, emit send requests."""
    from nudgeflow.worker import run_worker

    s = settings(
        broker=broker,
        journeys=journeys,
        app_id=app_id,
        data_dir=data_dir,
        topic_prefix=topic_prefix,
        partitions=partitions,
        metrics_port=metrics_port,
        log_level=log_level,
        log_file=log_file,
    )
    if s.broker is None:
        typer.echo(
            "nudgeflow run needs a broker: --broker kafka://host:9092 (or NUDGEFLOW_BROKER), "
            "or --broker embedded for an in-memory one that keeps nothing",
            err=True,
        )
        raise typer.Exit(2)
    _guard(lambda: run_worker(s))


@app.command()
def send(
    channel: Annotated[str, typer.Option(help=" | ".join(CHANNELS))] = "push",
    provider: Annotated[str, typer.Option(help=" | ".join(sorted(PROVIDERS)))] = "console",
    broker: Broker = None,
    group: Annotated[str | None, typer.Option(help="consumer group (default nudgeflow-sender-<channel>)")] = None,
    topic_prefix: Annotated[str | None, typer.Option()] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where delivered keys are kept")] = None,
) -> None:
    """Run a sender: deliver the send requests of one channel topic, once per idempotency key."""
    from nudgeflow.channels.providers import make_provider
    from nudgeflow.channels.sender import Sender, run_sender

    s = remote_settings("a sender", broker=broker, topic_prefix=topic_prefix, data_dir=data_dir)
    if channel not in CHANNELS:
        typer.echo(f"unknown channel '{channel}'; use one of {', '.join(CHANNELS)}", err=True)
        raise typer.Exit(2)
    try:
        chosen = make_provider(provider, channel)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    sender = Sender(
        s.kafka_conf(),
        channel,
        chosen,
        s.topics(),
        group or f"{s.app_id}-sender-{channel}",
        s.data_dir,
        int(s.session_timeout_s * 1000),
        signer=signer(s),
        rate_per_s=s.send_rate_per_s,
    )
    sender.keys.ttl_s = s.send_keys_ttl_s
    channel_metrics(s)
    _guard(lambda: run_sender(sender))


@app.command()
def calls(
    broker: Broker = None,
    group: Annotated[str | None, typer.Option(help="consumer group (default <app-id>-calls)")] = None,
    topic_prefix: Annotated[str | None, typer.Option()] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where answered keys are kept")] = None,
) -> None:
    """Run the call runner: perform the HTTP calls of `call` steps and feed the answers back."""
    from nudgeflow.channels.calls import CallRunner
    from nudgeflow.channels.clients import run_until_signalled
    from nudgeflow.channels.outbound import OutboundPolicy

    s = remote_settings("the call runner", broker=broker, topic_prefix=topic_prefix, data_dir=data_dir)
    runner = CallRunner(
        s.kafka_conf(),
        s.topics(),
        group or f"{s.app_id}-calls",
        s.data_dir,
        int(s.session_timeout_s * 1000),
        policy=_guard(lambda: OutboundPolicy(s.outbound_allow_hosts, s.outbound_allow_networks)),
        max_response_bytes=s.call_max_response_bytes,
        signer=signer(s),
    )
    channel_metrics(s)

    _guard(lambda: run_until_signalled(runner.run, runner.stop))


@app.command()
def enroll(
    journey: Annotated[str, typer.Option(help="id of a journey with entry: {enrolled: true}")],
    users: Annotated[Path, typer.Option(help="CSV with a user_id column; other columns become properties")],
    broker: Broker = None,
    topic_prefix: Annotated[str | None, typer.Option()] = None,
    journeys: JourneyPaths = None,
) -> None:
    """Enter a one-off list of users (CSV upload) into a journey. The journey must exist (in the
    journey files the workers run) with `entry: {enrolled: true}`, and the whole file is checked
    before anything is produced."""
    from nudgeflow.engine.loader import load_journeys
    from nudgeflow.enroll import enroll_events, produce_user_events
    from nudgeflow.streams.topics import CUSTOM_TOPIC

    s = remote_settings("enroll", broker=broker, topic_prefix=topic_prefix, journeys=journeys)

    def go() -> None:
        js = load_journeys(s.journeys)
        j = js.journeys.get(journey)
        if j is None:
            raise ConfigError(
                f"no journey '{journey}' in {', '.join(map(str, s.journeys))}; known: {', '.join(sorted(js.journeys))}"
            )
        if not j.entry.enrolled:
            raise ConfigError(f"journey '{journey}' does not take enrolments (it needs entry: {{enrolled: true}})")
        events = list(enroll_events(users, journey))  # every line checked before the first is produced
        with typer.progressbar(length=len(events), label="enrolling", file=sys.stderr) as bar:
            n = produce_user_events(s.kafka_conf(), s.topics().name(CUSTOM_TOPIC), events, progress=bar.update)
        typer.echo(f"enrolled {n} user(s) into {journey}")

    _guard(go)


@app.command()
def release(
    user: Annotated[list[str], typer.Option("--user", "-u", help="user id to release (repeatable)")],
    broker: Broker = None,
    topic_prefix: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Release quarantined users after a fix: their parked inputs are applied, their timers run."""
    import time

    from nudgeflow.enroll import produce_user_events, release_events
    from nudgeflow.streams.topics import CUSTOM_TOPIC

    s = remote_settings("release", broker=broker, topic_prefix=topic_prefix)

    def go() -> None:
        topic = s.topics().name(CUSTOM_TOPIC)
        n = produce_user_events(s.kafka_conf(), topic, release_events(user, int(time.time() * 1000)))
        typer.echo(f"asked the workers to release {n} user(s)")

    _guard(go)


@app.command()
def compile(
    status: Annotated[bool, typer.Option("--status", help="only say which modules run compiled")] = False,
) -> None:
    """Compile the hot modules in place (README "Compiled modules"); `make` does it for you."""
    from nudgeflow import compiled

    if not status:
        for path in compiled.build():
            typer.echo(f"compiled {path.relative_to(compiled.PACKAGE.parent)}")
    for module, state in compiled.status().items():
        typer.echo(f"{state:9} {module}")


@app.command()
def validate(paths: Annotated[list[Path], typer.Argument(help="journey files or directories")]) -> None:
    """Check journey and segment files; print what each journey does, or every error."""
    from nudgeflow.engine.loader import load_journeys

    try:
        js = load_journeys(paths)
    except JourneyFileErrors as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    for j in js.journeys.values():
        trig = (
            "|".join(j.entry.events)
            or j.entry.segment_entered
            or j.entry.segment_left
            or j.entry.attribute_changed
            or "enroll"
        )
        typer.echo(f"ok  {j.id} v{j.version} [{j.status}] entry={trig} steps={len(j.steps)}  ({j.file})")
    typer.echo(f"{len(js.journeys)} journey(s), {len(js.segments)} segment(s)")


@app.command()
def simulate(
    events: Annotated[Path, typer.Option(help="JSON lines of events (topic schema, with 'event')")],
    journeys: JourneyPaths = None,
    profiles: Annotated[Path | None, typer.Option(help="JSON lines: user_id, attributes, optional ts")] = None,
    until: Annotated[str | None, typer.Option(help="run timers up to this time (ISO-8601 or epoch ms)")] = None,
    out: Annotated[Path | None, typer.Option(help="write sends.jsonl and summary.jsonl here (default: stdout)")] = None,
    calls: Annotated[
        str | None,
        typer.Option(
            help="answers for call steps: a file of JSON lines {url: regex, body: {...} | error: why}, "
            "or 'live' to make the calls (outbound policy of the settings applies)"
        ),
    ] = None,
    trace_user: Annotated[str | None, typer.Option(help="print this user's path as it happens (stderr)")] = None,
) -> None:
    """Dry run: journeys over an events file on a virtual clock; sends and a per-step summary.
    The files are streamed (memory grows with users, not events); progress shows on a terminal."""
    from nudgeflow import simulate as sim_cmd
    from nudgeflow.engine.loader import load_journeys

    until_ms = _parse_time(until) if until else None
    try:
        js = load_journeys(journeys or [Path("journeys")])
    except JourneyFileErrors as e:
        typer.echo(f"invalid journey files:\n{e}", err=True)
        raise typer.Exit(2) from None

    def go() -> None:
        for path in (events, profiles, Path(calls) if calls and calls != "live" else None):
            if path is not None and not path.is_file():
                raise ConfigError(f"{path}: no such file")
        files = sim_cmd.InputFiles(events, profiles, sys.stderr)
        close = None
        answer: Any = None
        if calls == "live":
            from nudgeflow.channels.outbound import OutboundPolicy

            s = settings()
            policy = OutboundPolicy(s.outbound_allow_hosts, s.outbound_allow_networks)
            answer, close = sim_cmd.live_answers(policy, s.call_max_response_bytes)
        else:
            answer = sim_cmd.canned_answers(Path(calls)) if calls else None
        try:
            if not sys.stderr.isatty():
                sim_cmd.run(js, files, until_ms, out, answer, trace_user)
                return
            with typer.progressbar(length=files.size, label="simulating", file=sys.stderr) as bar:
                sim_cmd.run(js, files, until_ms, out, answer, trace_user, progress=bar.update)
        finally:
            if close is not None:
                close()

    _guard(go)


Counts = Annotated[
    str | None,
    typer.Option(help="counts from a worker's metrics URL (http://host:9464/metrics) or a simulate summary.jsonl"),
]


def _counts(source: str | None) -> Any:
    from nudgeflow import report

    if source is None:
        return None
    if source.startswith(("http://", "https://")):
        return report.counts_from_metrics(report.fetch_metrics(source))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{source}: neither a metrics URL nor a summary file")
    return report.counts_from_summary(path)


def _journeys(paths: list[Path] | None) -> Any:
    from nudgeflow.engine.loader import load_journeys

    return load_journeys(paths or settings().journeys)


@app.command()
def stats(
    counts: Counts = "http://127.0.0.1:9464/metrics",
    journeys: JourneyPaths = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of text")] = False,
) -> None:
    """Per journey: entered, in it now, exited by reason, converted, sends by channel; then every
    step in journey order with its visits, outcomes, sends and delivery feedback."""
    from nudgeflow import report

    def go() -> None:
        rows = report.stats_rows(_journeys(journeys), _counts(counts) or {})
        if as_json:
            typer.echo("\n".join(orjson_line(r) for r in rows))
        else:
            typer.echo(report.format_stats(rows), nl=False)

    _guard(go)


def orjson_line(row: Any) -> str:
    import orjson

    return orjson.dumps(row).decode()


@app.command()
def graph(
    journey: Annotated[str, typer.Argument(help="journey id")],
    journeys: JourneyPaths = None,
    fmt: Annotated[str, typer.Option("--format", help="mermaid | dot | svg | png")] = "mermaid",
    counts: Counts = None,
    out: Annotated[Path | None, typer.Option(help="write here (default: stdout)")] = None,
) -> None:
    """Draw a journey: its steps and arrows, with the counts on each (from --counts)."""
    from nudgeflow import report

    def go() -> None:
        if fmt not in ("mermaid", "dot", "svg", "png"):
            raise ConfigError(f"--format {fmt}: use mermaid, dot, svg or png")
        js = _journeys(journeys)
        j = js.journeys.get(journey)
        if j is None:
            raise ConfigError(f"no journey '{journey}'; known: {', '.join(sorted(js.journeys))}")
        c = _counts(counts)
        data = report.render(j, c.get(journey, report.JourneyCounts()) if c is not None else None, fmt)
        if out is not None:
            out.write_bytes(data)
        elif fmt in ("svg", "png") and sys.stdout.isatty():
            raise ConfigError(f"--format {fmt} is an image: give --out FILE")
        else:
            sys.stdout.buffer.write(data)

    _guard(go)


@app.command()
def inspect(
    user: Annotated[str, typer.Option("--user", "-u", help="user id")],
    broker: Broker = None,
    journeys: JourneyPaths = None,
    values: Annotated[bool, typer.Option(help="show profile, trigger and saved values (personal data)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the stored record as JSON")] = False,
) -> None:
    """Why did this user get (or not get) a message: their journeys, steps, wake-ups, entries and
    recent sends with trigger event ids, read-only from the workers' state changelog."""
    import time

    from nudgeflow import report

    s = remote_settings("inspect", broker=broker, journeys=journeys)

    def go() -> None:
        js = _journeys(journeys)
        changelog = f"{s.app_id}-journey-state-changelog"
        rec, p, offset, n = report.find_user(s.kafka_conf(), changelog, user)
        if rec is None:
            typer.echo(f"user {user}: no stored state in {changelog}" + (" (deleted)" if n else ""))
            raise typer.Exit(1)
        if as_json:
            typer.echo(orjson_line(rec))
            return
        typer.echo(f"{changelog} partition {p} offset {offset}")
        typer.echo("\n".join(report.inspect_lines(js, user, rec, int(time.time() * 1000), values)))

    _guard(go)


def _parse_time(text: str) -> int:
    from nudgeflow.engine.timeparse import datetime_to_ms, parse_iso

    if text.isdigit():
        return int(text)
    d = parse_iso(text)
    if d is None:
        typer.echo(f"--until: '{text}' is not ISO-8601 or epoch milliseconds", err=True)
        raise typer.Exit(2) from None
    return datetime_to_ms(d)


@app.command()
def schema() -> None:
    """Print the JSON Schema of journey files."""
    from nudgeflow.engine.schema import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="synthetic users")] = 3000,
    rate: Annotated[float, typer.Option(help="events per second")] = 150.0,
    duration: Annotated[float, typer.Option(help="seconds to run; 0 = until Ctrl-C")] = 0.0,
    journeys: JourneyPaths = None,
    metrics_port: Annotated[int, typer.Option(help="worker metrics port (0: any free)")] = 9464,
) -> None:
    """The whole thing on this machine: broker, worker, traffic, console sender, metrics."""
    from nudgeflow.demo import run_demo

    _guard(
        lambda: run_demo(
            users=users,
            rate=rate,
            duration=duration,
            journeys=journeys or [Path(__file__).resolve().parent / "demo_journeys"],
            metrics_port=metrics_port,
        )
    )


def _guard(fn: Any) -> Any:
    try:
        return fn()
    except JourneyFileErrors as e:
        typer.echo(f"invalid journey files:\n{e}", err=True)
        raise typer.Exit(2) from None
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except NudgeflowError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        from nudgeflow import __version__

        typer.echo(f"nudgeflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """nudgeflow: real-time customer journeys on Kafka."""


def main() -> None:
    app(prog_name="nudgeflow")


if __name__ == "__main__":
    main()
