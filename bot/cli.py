"""The `spinbot` command: parses arguments, calls the package, translates errors. No logic here."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import track
from rich.table import Table

from bot.config import ConfigError, load_settings
from bot.datasets import DataError
from bot.knowledge import KnowledgeError
from bot.llm import LLMError
from bot.prompts import PromptError
from bot.runtime import Runtime
from bot.scenarios import ScenarioError
from bot.text import InputError
from bot.transcripts import TranscriptError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="spinbot: a SPIN Selling practice gym.")
eval_app = typer.Typer(no_args_is_help=True, help="Offline evaluations over labelled sets and saved calls.")
app.add_typer(eval_app, name="eval")

console = Console()
errors = Console(stderr=True)

JsonOption = Annotated[
    str | None, typer.Option("--json", help="Write JSON to this file ('-' for stdout).", metavar="F")
]
BAD_INPUT = (ConfigError, InputError, DataError, KnowledgeError, PromptError, ScenarioError, TranscriptError)
T = TypeVar("T")


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Known failures become one line on stderr and exit 2 (bad input) or 1 (anything else)."""
    try:
        yield
    except BAD_INPUT as exc:
        # escape(): a message may quote a path or text holding [tags] that rich would parse as markup.
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    except LLMError as exc:
        errors.print(f"[red]LLM error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _runtime() -> Runtime:
    return Runtime(load_settings())


def _write_json(target: str | None, payload: Any) -> None:
    if target is None:
        return
    text = json.dumps(payload, ensure_ascii=False, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def _run(fn: Callable[[], T]) -> T:
    with _translated_errors():
        return fn()


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve off loopback without SPINBOT_AUTH (not recommended).")
    ] = False,
) -> None:
    """Serve the web app."""

    def serve() -> None:
        from bot.ui import serve as serve_ui

        serve_ui(_runtime(), host=host, port=port, no_auth=no_auth)

    _run(serve)


@app.command()
def index(rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild even if current.")] = False) -> None:
    """Build or refresh the Chroma index of knowledge/."""

    def build() -> None:
        runtime = _runtime()
        report = runtime.index.ensure(rebuild=rebuild)
        state = "built" if report.built else "up to date"
        console.print(
            f"index {state}: {report.chunks} chunks, {report.seconds:.1f} s, "
            f"fingerprint {report.fingerprint} ({runtime.embeddings.name})"
        )

    _run(build)


@app.command()
def retrieve(
    question: str,
    k: Annotated[int, typer.Option("--k", min=1, max=20, help="How many passages.")] = 4,
    json_out: JsonOption = None,
) -> None:
    """Top passages for a question."""

    def search() -> None:
        from bot.text import clean_message

        text = clean_message(question, what="question")
        passages = _runtime().index.search(text, k=k)
        payload = {"question": text, "k": k, "passages": [p.to_json() for p in passages]}
        _write_json(json_out, payload)
        if json_out != "-":
            for i, p in enumerate(passages, start=1):
                console.print(f"[bold][{i}][/bold] {p.source}  (score {p.score:.4f})", highlight=False)
                console.print(p.text, highlight=False, markup=False)
                console.print()

    _run(search)


@app.command()
def coach(question: str, json_out: JsonOption = None) -> None:
    """Ask the coach a question about the course."""

    def ask() -> None:
        answer = _runtime().coach.answer(question)
        _write_json(json_out, answer.to_json())
        if json_out != "-":
            console.print(answer.text, highlight=False, markup=False)
            if answer.sources:
                console.print("\n[bold]Sources[/bold]")
                for i, p in enumerate(answer.retrieved, start=1):
                    if p in answer.sources:
                        console.print(f"[{i}] {p.source}", highlight=False, markup=False)

    _run(ask)


@eval_app.command("retrieval")
def eval_retrieval_cmd(
    data: Annotated[Path, typer.Option("--data", help="JSONL with id, question, all_of.")],
    k: Annotated[int, typer.Option("--k", min=1, max=20)] = 4,
    json_out: JsonOption = None,
) -> None:
    """Hit rate of retrieval on a coach-dev style set."""

    def run() -> None:
        from bot.evaluation import eval_retrieval

        runtime = _runtime()
        runtime.index.ensure()
        result = eval_retrieval(
            runtime.index, data, k=k, progress=lambda xs: track(list(xs), description="retrieving", console=errors)
        )
        _write_json(json_out, result)
        if json_out != "-":
            table = Table("id", "lang", "hit", "question")
            for row in result["samples"]:
                table.add_row(row["id"], row["lang"], "yes" if row["hit"] else "[red]no[/red]", row["question"])
            console.print(table)
            console.print(f"n={result['n']} k={k} hit_rate={result['hit_rate']:.3f}")

    _run(run)


@app.command()
def grade(
    utterance: str,
    context: Annotated[str, typer.Option("--context", help="The buyer's previous line.")] = "",
    grader: Annotated[str | None, typer.Option("--grader", help="offline or llm (default: the engine).")] = None,
    json_out: JsonOption = None,
) -> None:
    """Label one rep utterance S / P / I / N / O."""

    def run() -> None:
        from bot.text import clean_message

        text = clean_message(utterance, what="utterance")
        result = _runtime().grader(_grader_kind(grader)).grade(text, context)
        _write_json(json_out, {"utterance": text, "context": context, **result.to_json()})
        if json_out != "-":
            label = result.label or "ungraded"
            console.print(f"[bold]{label}[/bold]  {result.reason}", highlight=False)
            if result.better_question:
                console.print(f"better: {result.better_question}", highlight=False, markup=False)

    _run(run)


@app.command("train-grader")
def train_grader(
    folds: Annotated[int, typer.Option("--folds", min=2, max=20, help="Cross-validation folds.")] = 5,
    json_out: JsonOption = None,
) -> None:
    """Retrain the offline grader on evals/data/spin-train-*.jsonl and report cross-validated figures."""

    def run() -> None:
        from bot.evaluation import score_grades
        from bot.grader import CachedEmbeddings, Grade, OfflineGrader, cross_validate, load_training_set
        from bot.knowledge import bundled_embeddings

        runtime = _runtime()
        embeddings = CachedEmbeddings(bundled_embeddings())
        items = load_training_set()
        with console.status(f"cross-validating on {len(items)} utterances ({folds} folds)"):
            _, predicted = cross_validate(items, embeddings, folds=folds)
        result = score_grades(items, [Grade(p, "cross-validated") for p in predicted], f"offline ({folds}-fold CV)")
        with console.status("training on the whole set"):
            OfflineGrader.load_or_train(bundled_embeddings(), runtime.settings.spinbot_home / "models", retrain=True)
        _write_json(json_out, result)
        if json_out != "-":
            _print_grader_summary(result)

    _run(run)


def _grader_kind(value: str | None) -> Any:
    if value not in (None, "offline", "llm"):
        raise InputError(f"--grader must be offline or llm, not {value!r}")
    return value


def _print_grader_summary(result: dict[str, Any]) -> None:
    table = Table("set", "n", "accuracy", "macro-F1", "kappa", "min label F1", "ungraded")
    for name, m in [("all", result), *result["by_language"].items()]:
        worst = min(v["f1"] for v in m["per_label"].values())
        table.add_row(
            name, str(m["n"]), f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}", f"{m['kappa']:.3f}",
            f"{worst:.3f}", str(m["ungraded"]),
        )
    console.print(f"[bold]{result['grader']}[/bold]", highlight=False)
    console.print(table)


@eval_app.command("grader")
def eval_grader_cmd(
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL (spin-labels.md format).")],
    grader: Annotated[str, typer.Option("--grader", help="offline or llm.")] = "offline",
    compare: Annotated[
        str | None, typer.Option("--compare", help="Two graders to compare, e.g. offline,llm.")
    ] = None,
    json_out: JsonOption = None,
    report_dir: Annotated[
        Path | None, typer.Option("--report-dir", help="Where the Markdown report and PNG go.")
    ] = None,
) -> None:
    """Score a grader against a labelled set: accuracy, macro-F1, kappa, per label, confusion."""

    def run() -> None:
        from rich.progress import Progress

        from bot.datasets import read_jsonl
        from bot.evaluation import agreement, confusion_png, grader_report_markdown, score_grades
        from bot.grader import LabelledUtterance, grade_many

        runtime = _runtime()
        kinds = [_grader_kind(k.strip()) for k in compare.split(",")] if compare else [_grader_kind(grader)]
        if len(kinds) not in (1, 2):
            raise InputError("--compare takes two graders, e.g. offline,llm")
        items = read_jsonl(data, LabelledUtterance)
        pairs = [(i.utterance, i.context) for i in items]
        graders = [runtime.grader(kind) for kind in kinds]
        all_grades = []
        for kind, chosen in zip(kinds, graders, strict=True):
            concurrency = runtime.settings.spinbot_concurrency if kind == "llm" else 1
            with Progress(console=errors, transient=True) as progress:
                task = progress.add_task(f"grading with {chosen.name}", total=len(pairs))
                advance = functools.partial(progress.advance, task)
                all_grades.append(grade_many(chosen, pairs, concurrency=concurrency, on_done=advance))
        result = score_grades(items, all_grades[0], graders[0].name)
        if len(kinds) == 2:
            result["compare"] = {"other": kinds[1], **agreement(all_grades[0], all_grades[1])}
            result["compare"]["other_metrics"] = {
                k: v for k, v in score_grades(items, all_grades[1], kinds[1]).items() if k != "samples"
            }
        _write_json(json_out, result)
        folder = report_dir or (Path(json_out).parent if json_out not in (None, "-") else Path.cwd())
        stem = Path(json_out).stem if json_out not in (None, "-") else f"grader-eval-{kinds[0]}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.md").write_text(grader_report_markdown(result, data), encoding="utf-8")
        confusion_png(result, folder / f"{stem}.png", f"{result['grader']} on {data.name}")
        if json_out != "-":
            _print_grader_summary(result)
            if "compare" in result:
                c = result["compare"]
                console.print(f"agreement with {c['other']}: {c['agreement']:.3f} (kappa {c['kappa']:.3f})")
            console.print(f"report: {folder / (stem + '.md')}", highlight=False)

    _run(run)


@eval_app.command("roleplay")
def eval_roleplay_cmd(
    data: Annotated[
        Path | None, typer.Option("--data", help="A folder of scripted calls (default evals/data/roleplay).")
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Play the scripted archetype calls on every card, both languages, and check the outcome a trainer expects."""

    def run() -> None:
        from bot import conformance, scenarios

        runtime = _runtime()
        scripts = conformance.load_scripts(data or conformance.ROLEPLAY_DIR)
        total = sum(len(by) for s in scripts for by in s.calls.values())
        verdicts = list(track(
            conformance.run(lambda card, language: runtime.new_session(card.id, language, save=False),
                            scenarios.get, scripts),
            total=total, description="playing", console=errors,
        ))
        table = Table("card", "archetype", "lang", "outcome", "trust", "expected", "verdict")
        for v in verdicts:
            expected = conformance.EXPECTATIONS[v.archetype].expected.en
            table.add_row(v.card, v.archetype, v.language, v.outcome, f"{v.trust:.2f}", expected,
                          "ok" if v.passed else f"[red]{escape(v.failure or '')}[/red]")
        console.print(table)
        passed = sum(v.passed for v in verdicts)
        console.print(f"{passed}/{len(verdicts)} calls behaved as a trainer expects", highlight=False)
        _write_json(json_out, {"passed": passed, "calls": [dataclasses.asdict(v) for v in verdicts]})

    _run(run)


@eval_app.command("reading")
def eval_reading_cmd(
    data: Annotated[Path, typer.Option("--data", help="JSONL with label, move and/or card+topic per line.")],
    reader: Annotated[str, typer.Option("--reader", help="offline or llm.")] = "offline",
    json_out: JsonOption = None,
) -> None:
    """Score the reading of rep lines: label, move (and attacks), topic, with confusion matrices per language."""

    def run() -> None:
        from bot import scenarios
        from bot.evaluation import ReadingSample, eval_readings

        runtime = _runtime()
        kind = _grader_kind(reader)
        readers: dict[str, Any] = {}
        default_card = scenarios.builtin()[0].id

        def read(sample: ReadingSample) -> Any:
            card_id = sample.card or default_card
            if card_id not in readers:
                readers[card_id] = runtime.reader(scenarios.get(card_id), kind)
            return readers[card_id].read(sample.utterance, sample.context, sample.focus)

        result = eval_readings(read, data, progress=lambda items: track(items, "reading", console=errors))
        _write_json(json_out, result)
        if json_out != "-":
            _print_reading_summary(result)

    _run(run)


def _print_reading_summary(result: dict[str, Any]) -> None:
    table = Table("what", "set", "n", "accuracy", "macro-F1", "kappa")
    for what in ("label", "move"):
        if what in result:
            for name, m in [("all", result[what]), *result[what]["by_language"].items()]:
                table.add_row(what, name, str(m["n"]), f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                              f"{m['kappa']:.3f}")
    if "topic" in result:
        t = result["topic"]
        for name, m in [("all", t), *t["by_language"].items()]:
            table.add_row("topic", name, str(m["n"]), f"{m['accuracy']:.3f}",
                          f"none P {m['none']['precision']:.3f} R {m['none']['recall']:.3f}", "")
    console.print(table)
    if "attack" in result:
        a = result["attack"]
        recall = "n/a" if a["recall"] is None else f"{a['recall']:.3f}"
        rate = "n/a" if a["false_alarm_rate"] is None else f"{a['false_alarm_rate']:.3%}"
        console.print(f"attacks caught {a['caught']}/{a['attempts']} (recall {recall}); false alarms on real "
                      f"questions {a['false_alarms']}/{a['real_questions']} ({rate})", highlight=False)


scenarios_app = typer.Typer(no_args_is_help=True, help="Scenario cards for the role-play.")
app.add_typer(scenarios_app, name="scenarios")


@scenarios_app.command("list")
def scenarios_list(json_out: JsonOption = None) -> None:
    """The built-in scenario cards."""

    def run() -> None:
        from bot import scenarios

        cards = [s.summary() for s in scenarios.builtin()]
        _write_json(json_out, cards)
        if json_out != "-":
            table = Table("id", "title", "value type", "sales type", "difficulty")
            for c in cards:
                table.add_row(c["id"], f"{c['title_zh']} / {c['title']}", c["value_type"], c["sales_type"],
                              c["difficulty"])
            console.print(table)

    _run(run)


@scenarios_app.command("validate")
def scenarios_validate(
    path: Annotated[Path | None, typer.Argument(help="A card or a folder of cards.")] = None,
) -> None:
    """Check scenario cards against the schema and their types; errors name the file and field."""

    def run() -> None:
        from bot import scenarios

        cards = scenarios.load_all(path or scenarios.SCENARIOS_DIR)
        misfits = [f"{card.id}: {problem}" for card in cards for problem in card.coherence()]
        if misfits:
            raise ScenarioError("cards do not fit their types: " + "; ".join(misfits))
        console.print(f"{len(cards)} card(s) valid: {', '.join(c.id for c in cards)}", highlight=False)

    _run(run)


@app.command()
def chat(
    scenario: Annotated[str, typer.Option("--scenario", help="Scenario id (see `scenarios list`).")],
    lang: Annotated[str, typer.Option("--lang", help="zh or en.")] = "zh",
    script: Annotated[Path | None, typer.Option("--script", help="Replay one rep line per line.")] = None,
    json_out: JsonOption = None,
) -> None:
    """Play a call in the terminal, or replay a script; every turn is saved as it happens."""

    def run() -> None:
        from bot import debrief
        from bot.session import TurnResult
        from bot.text import clean_message

        if lang not in ("zh", "en"):
            raise InputError(f"--lang must be zh or en, not {lang!r}")
        lines: list[str] | None = None
        if script is not None:
            try:
                # "\n" only: splitlines() also breaks at control characters such as \x0c or \x1c,
                # and the line numbers in error messages would no longer match the file.
                raw = script.read_text(encoding="utf-8").split("\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"{script}: cannot read the script ({exc})") from None
            lines = []
            for number, line in enumerate(raw, start=1):
                if line.strip():
                    try:
                        lines.append(clean_message(line))
                    except InputError as exc:
                        raise InputError(f"{script}:{number}: {exc}") from None
        runtime = _runtime()
        session = runtime.new_session(scenario, lang)  # type: ignore[arg-type]
        quiet = json_out == "-"
        if not quiet:
            console.print(f"[dim]{runtime.describe()}[/dim]", highlight=False)
            console.print(f"[bold]{session.card.buyer.name(session.language)}[/bold]: {session.opening}",
                          highlight=False)
        source = iter(lines) if lines is not None else _prompt_lines()
        for text in source:
            if not quiet and lines is not None:
                console.print(f"[cyan]you[/cyan]: {text}", highlight=False)
            try:
                parts = session.play_stream(text)
                for part in parts:
                    if isinstance(part, TurnResult):
                        _print_turn(part, quiet)
                    elif not quiet:
                        console.print(part, end="", highlight=False, markup=False)
            except InputError as exc:
                if lines is not None:
                    raise
                errors.print(f"[red]{exc}[/red]")
                continue
            if session.state.ended:
                break
        state = session.end()
        report = debrief.build(session.card, _turns(session), session.language, outcome=state.outcome)
        coach_model = runtime.model("coach")
        if coach_model is not None:
            report = debrief.with_llm(report, session.card, _turns(session), coach_model)
        payload = {
            "header": session.header.model_dump(),
            "transcript": str(session.transcript_path),
            "turns": [r.to_json() for r in session.results],
            "outcome": state.outcome,
            "debrief": report.to_json(),
        }
        _write_json(json_out, payload)
        if not quiet:
            console.print()
            console.print(debrief.markdown(report), highlight=False, markup=False)
            console.print(f"[dim]saved: {session.transcript_path}[/dim]", highlight=False)

    _run(run)


def _prompt_lines() -> Iterator[str]:
    while True:
        try:
            text = console.input("[cyan]you[/cyan]: ")
        except (EOFError, KeyboardInterrupt):
            return
        if text.strip() in ("/end", "/quit"):
            return
        yield text


def _print_turn(result: Any, quiet: bool) -> None:
    if quiet:
        return
    console.print()
    label = result.reading.label or "?"
    console.print(f"[dim]  [{label}] {result.reading.reason}  trust {result.state.trust:.2f}[/dim]", highlight=False)
    if result.notice:
        errors.print(f"[yellow]{result.notice}[/yellow]", highlight=False)


def _turns(session: Any) -> list[Any]:
    from bot.transcripts import Turn

    return [Turn.model_validate({k: v for k, v in r.to_json().items()}) for r in session.results]


@eval_app.command("transcripts")
def eval_transcripts_cmd(
    target: Annotated[Path, typer.Argument(help="A transcript file or a folder of them.")],
    json_out: JsonOption = None,
) -> None:
    """Per-call SPIN mix, needs uncovered and outcome, with totals."""

    def run() -> None:
        from bot.evaluation import eval_transcripts

        result = eval_transcripts(target)
        _write_json(json_out, result)
        if json_out != "-":
            table = Table("call", "scenario", "turns", "S", "P", "I", "N", "O", "implied", "explicit", "outcome")
            for c in result["calls"]:
                table.add_row(Path(c["path"]).name, c["scenario"], str(c["turns"]),
                              *[str(c["counts"][k]) for k in "SPINO"],
                              str(c["implied_needs"]), str(c["explicit_needs"]), c["outcome"])
            console.print(table)
            t = result["totals"]
            console.print(f"calls {result['n']}, turns {t['turns']}, outcomes {t['outcomes']}", highlight=False)

    _run(run)


def main() -> None:
    app()
