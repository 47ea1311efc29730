"""One practice call: grade each rep line, step the state machine, let the buyer speak, save the turn."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bot import roleplay
from bot.buyer import Buyer, BuyerTurn
from bot.grader import Grade, Grader
from bot.llm import LLMError
from bot.roleplay import Analyzer, CallState, Reaction
from bot.scenarios import Scenario
from bot.text import InputError, Language, clean_message
from bot.transcripts import TranscriptWriter, Turn, header_now

BUYER_FALLBACK_NOTICE = {
    "zh": "大模型这次没有回应（{error}）。买方的回答取自场景卡片，你可以继续对话。",
    "en": "The LLM did not answer this time ({error}). The buyer's reply comes from the scenario card; go on.",
}


@dataclass(frozen=True)
class TurnResult:
    turn: int
    rep: str
    grade: Grade
    buyer: str
    state: CallState
    reaction: Reaction
    notice: str | None = None

    @property
    def ended(self) -> bool:
        return self.state.ended

    def to_json(self) -> dict[str, object]:
        return {
            "turn": self.turn,
            "rep": self.rep,
            "label": self.grade.label,
            "reason": self.grade.reason,
            "better_question": self.grade.better_question,
            "buyer": self.buyer,
            "state": self.state.to_json(),
            "reaction": self.reaction.to_json(),
            "notice": self.notice,
        }


class PracticeSession:
    """A call against one scenario card; every completed turn is on disk before it is returned."""

    def __init__(
        self,
        card: Scenario,
        language: Language,
        *,
        grader: Grader,
        buyer: Buyer,
        analyzer: Analyzer,
        transcript: Path | None,
        engine: str,
        model: str,
        predictor: Grader | None = None,
    ) -> None:
        self.card = card
        self.language = language
        self._grader = grader
        self._buyer = buyer
        self._analyzer = analyzer
        self._predictor = predictor
        self.speculated = False
        self.state = roleplay.start(card)
        self.history: list[tuple[str, str]] = []
        self.results: list[TurnResult] = []
        self.opening = card.opening(language)
        self.header = header_now(card.id, engine, model, language)
        self._writer = TranscriptWriter(transcript, self.header) if transcript is not None else None

    @property
    def transcript_path(self) -> Path | None:
        return self._writer.path if self._writer is not None else None

    def play(self, rep_text: str) -> TurnResult:
        """One whole turn, without streaming."""
        result = None
        for part in self.play_stream(rep_text):
            if isinstance(part, TurnResult):
                result = part
        assert result is not None
        return result

    def play_stream(self, rep_text: str) -> Iterator[str | TurnResult]:
        """Yield the buyer's reply as it is spoken (LLM engine), then the saved TurnResult."""
        if self.state.ended:
            raise InputError("the call has ended: start a new call to practise again")
        text = clean_message(rep_text)
        context = f"buyer: {self.history[-1][1]}" if self.history else f"buyer: {self.opening}"
        # The grade is the slow part on the LLM engine; topic matching runs beside it, and the
        # buyer starts speaking on the predictor's label, kept only if the grader agrees.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._grader.grade, text, context)
            analysis = self._analyzer.analyse(text)
            guess: tuple[str | None, BuyerTurn, _Prefetch] | None = None
            if self._predictor is not None and self._buyer.streams:
                label = self._predictor.grade(text, context).label
                planned_turn = self._plan(label, analysis, text)
                guess = (label, planned_turn, _Prefetch(self._buyer.reply, planned_turn))
            grade = pending.result()
        if guess is not None and guess[0] == grade.label:
            turn, replies = guess[1], guess[2].items()
        else:
            turn = self._plan(grade.label, analysis, text)
            replies = self._buyer.reply(turn)
        self.speculated = guess is not None and guess[0] == grade.label
        state, reaction, planned = turn.state, turn.reaction, turn.planned
        notice = None if grade.graded else grade.reason
        parts: list[str] = []
        try:
            for delta in replies:
                parts.append(delta)
                if self._buyer.streams:
                    yield delta
        except LLMError as exc:
            notice = BUYER_FALLBACK_NOTICE[self.language].format(error=exc)
            parts = [planned]
        buyer_text = "".join(parts).strip() or planned
        result = TurnResult(state.turn, text, grade, buyer_text, state, reaction, notice)
        if self._writer is not None:
            self._writer.append(
                Turn(
                    turn=result.turn, rep=text, label=grade.label, reason=grade.reason,
                    better_question=grade.better_question, buyer=buyer_text, state=state.to_json(),
                    reaction=reaction.to_json(), notice=notice,
                )
            )
        self.state = state
        self.history.append((text, buyer_text))
        self.results.append(result)
        if not self._buyer.streams:
            yield buyer_text
        yield result

    def _plan(self, label: str | None, analysis: roleplay.Analysis, text: str) -> BuyerTurn:
        state, reaction = roleplay.step(self.card, self.state, label, analysis)
        state, planned = roleplay.speak(self.card, state, reaction, self.language)
        return BuyerTurn(self.card, state, reaction, planned, text, tuple(self.history), self.language)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def end(self) -> CallState:
        """End the call where it stands (no commitment asked): a Continuation at best."""
        if not self.state.ended:
            self.state = replace(self.state, outcome=roleplay.unfinished_outcome(self.state))
        self.close()
        return self.state


class _Prefetch:
    """Runs a reply stream in a daemon thread from now on; items() replays it in order.

    A daemon thread, not a pool worker: a discarded guess must not hold up the turn.
    """

    _DONE = object()

    def __init__(self, reply: Callable[[BuyerTurn], Iterator[str]], turn: BuyerTurn) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        threading.Thread(target=self._run, args=(reply, turn), daemon=True).start()

    def _run(self, reply: Callable[[BuyerTurn], Iterator[str]], turn: BuyerTurn) -> None:
        try:
            for delta in reply(turn):
                self._queue.put(delta)
        except BaseException as exc:  # handed to the consumer, which decides
            self._queue.put(exc)
        self._queue.put(self._DONE)

    def items(self) -> Iterator[str]:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield str(item)
