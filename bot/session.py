"""One practice call: read each rep line, step the state machine, let the buyer speak, save the turn."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bot import roleplay
from bot.buyer import Buyer, BuyerTurn
from bot.llm import LLMError
from bot.reading import Reader, Reading
from bot.roleplay import CallState, Reaction
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
    reading: Reading
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
            "label": self.reading.label,
            "reason": self.reading.reason,
            "better_question": self.reading.better_question,
            "buyer": self.buyer,
            "state": self.state.to_json(),
            "reaction": self.reaction.to_json(),
            "notice": self.notice,
            "move": self.reading.move,
            "topic": self.reading.topic,
            "reader": self.reading.reader,
        }


class PracticeSession:
    """A call against one scenario card; every completed turn is on disk before it is returned."""

    def __init__(
        self,
        card: Scenario,
        language: Language,
        *,
        reader: Reader,
        buyer: Buyer,
        transcript: Path | None,
        engine: str,
        model: str,
        predictor: Reader | None = None,
    ) -> None:
        self.card = card
        self.language = language
        self._reader = reader
        self._buyer = buyer
        self._predictor = predictor
        self.speculated = False
        self.state = roleplay.start(card)
        self.history: list[tuple[str, str]] = []
        self.results: list[TurnResult] = []
        self.opening = card.opening(language)
        self.header = header_now(card.id, engine, model, language)
        self._writer = TranscriptWriter(transcript, self.header) if transcript is not None else None
        self._prepare(f"buyer: {self.opening}")

    def _prepare(self, context: str) -> None:
        """Let the readers work on the buyer's words while the rep reads them and types."""
        for reader in (self._reader, self._predictor):
            if reader is not None:
                threading.Thread(target=_quietly, args=(reader.prepare, context), daemon=True).start()

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
        focus = self.state.focus
        # The reading is the slow part on the LLM engine; the buyer starts speaking on the offline
        # predictor's reading, kept only if the real reading leads to the same turn.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._reader.read, text, context, focus)
            guess: tuple[BuyerTurn, _Prefetch] | None = None
            if self._predictor is not None and self._buyer.streams:
                planned_turn = self._plan(self._predictor.read(text, context, focus), text)
                guess = (planned_turn, _Prefetch(self._buyer.reply, planned_turn))
            reading = pending.result()
        turn = self._plan(reading, text)
        agreed = guess is not None and _same_turn(guess[0], turn)
        replies = guess[1].items() if guess is not None and agreed else self._buyer.reply(turn)
        self.speculated = agreed
        state, reaction, planned = turn.state, turn.reaction, turn.planned
        notice = None if reading.graded else reading.reason
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
        result = TurnResult(state.turn, text, reading, buyer_text, state, reaction, notice)
        if self._writer is not None:
            self._writer.append(
                Turn(
                    turn=result.turn, rep=text, label=reading.label, reason=reading.reason,
                    better_question=reading.better_question, buyer=buyer_text, state=state.to_json(),
                    reaction=reaction.to_json(), notice=notice, move=reading.move, topic=reading.topic,
                    reader=reading.reader,
                )
            )
        self.state = state
        self.history.append((text, buyer_text))
        self.results.append(result)
        if not state.ended:
            self._prepare(f"buyer: {buyer_text}")
        if not self._buyer.streams:
            yield buyer_text
        yield result

    def _plan(self, reading: Reading, text: str) -> BuyerTurn:
        state, reaction = roleplay.step(self.card, self.state, reading)
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


def _quietly(work: Callable[[str], None], argument: str) -> None:
    # Work done ahead is only a head start: the reading does it again if it failed here.
    with contextlib.suppress(Exception):
        work(argument)


def _same_turn(guess: BuyerTurn, actual: BuyerTurn) -> bool:
    """A guessed reply may stand when the real reading leads to the very same reaction and state."""
    return guess.reaction == actual.reaction and guess.state == actual.state


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
