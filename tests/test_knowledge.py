"""knowledge/: chunking, the section map, the Chroma index (fingerprint, rebuilds) and hybrid retrieval."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.config import KNOWLEDGE_DIR, Settings
from bot.knowledge import KnowledgeError, KnowledgeIndex, load_chunks
from bot.testing import FakeEmbeddingModel

COURSE = KNOWLEDGE_DIR / "course" / "spin-course-zh.txt"

# --- chunking the real knowledge/ ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_chunks() -> list:
    return load_chunks()


def test_course_sections_carry_line_ranges_titles_and_language(real_chunks: list) -> None:
    course = [d for d in real_chunks if d.metadata["source"].startswith("course/")]
    assert len(course) > 30
    lines = COURSE.read_text(encoding="utf-8").splitlines()
    expected_start = 1
    for doc in course:
        match = re.fullmatch(r"course/spin-course-zh\.txt#L(\d+)-L(\d+)", doc.metadata["source"])
        assert match, doc.metadata["source"]
        start, end = int(match.group(1)), int(match.group(2))
        assert start >= expected_start and end >= start
        expected_start = end + 1
        assert doc.metadata["language"] == "zh"
        zh_title, sep, en_title = doc.metadata["title"].partition(" / ")
        assert sep and zh_title and en_title, doc.metadata["title"]
        # The chunk is exactly those lines of the course.
        assert doc.page_content == "\n".join(lines[start - 1 : end]).strip()
    assert expected_start == len(lines) + 1, "the section map must cover the whole course"


def test_concept_notes_split_at_headings_with_language_from_file_name(real_chunks: list) -> None:
    concepts = [d for d in real_chunks if d.metadata["source"].startswith("concepts/")]
    files = {d.metadata["source"].split("#")[0] for d in concepts}
    assert files == {f"concepts/{p.name}" for p in (KNOWLEDGE_DIR / "concepts").glob("*.md")}
    for doc in concepts:
        file = doc.metadata["source"].split("#")[0]
        assert doc.metadata["language"] == file.rsplit(".", 2)[1], doc.metadata
        assert not doc.page_content.lstrip().startswith("#"), "headings are stripped from the body"
    section = next(
        d for d in concepts if d.metadata["source"] == "concepts/implication-questions.zh.md#暗示问题的作用"
    )
    assert section.metadata["title"] == "暗示问题（Implication Questions） > 暗示问题的作用"
    assert "连锁反应" in section.page_content
    assert "## " not in section.page_content


def test_chunk_ids_are_unique_and_stable(real_chunks: list) -> None:
    ids = [d.id for d in real_chunks]
    assert len(set(ids)) == len(ids)
    assert ids == [d.id for d in load_chunks()]


def test_tiny_knowledge_chunks(tiny_knowledge: Path) -> None:
    docs = load_chunks(tiny_knowledge)
    assert [d.metadata["source"] for d in docs] == [
        "course/mini-course-zh.txt#L1-L1",
        "course/mini-course-zh.txt#L2-L3",
        "concepts/objections.en.md#Preventing objections",
        "concepts/objections.en.md#Pricing",
        "concepts/trust.zh.md#信任的定义",
    ]
    assert docs[1].metadata["title"] == "暗示与需求效益 / Implication and need-payoff"
    assert [d.metadata["language"] for d in docs] == ["zh", "zh", "en", "en", "zh"]
    assert docs[3].metadata["title"] == "Objections > Pricing"


def test_course_without_a_section_map_is_split_by_size(tiny_knowledge: Path) -> None:
    (tiny_knowledge / "course" / "sections.yaml").unlink()
    course = [d for d in load_chunks(tiny_knowledge) if d.metadata["source"].startswith("course/")]
    assert course and all(d.metadata["source"] == "course/mini-course-zh.txt" for d in course)


def test_empty_knowledge_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="no course or concept text found"):
        load_chunks(tmp_path)


# --- sections.yaml errors name the file and the field ---------------------------------------------


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (  # a title without its English half
            "sections:\n  - {start: 1, end: 1, title: {zh: 标题}}\n  - {start: 2, end: 3, title: {zh: b, en: b}}\n",
            "sections.0.title.en: Field required",
        ),
        (  # a misspelt field
            "sections:\n  - {start: 1, end: 3, title: {zh: a, en: a}, titel: x}\n",
            "sections.0.titel: Extra inputs are not permitted",
        ),
        (  # a gap between sections
            "sections:\n  - {start: 1, end: 1, title: {zh: a, en: a}}\n  - {start: 3, end: 3, title: {zh: b, en: b}}\n",
            "should start at line 2",
        ),
        (  # the map stops before the file does
            "sections:\n  - {start: 1, end: 2, title: {zh: a, en: a}}\n",
            "sections end at line 2, but mini-course-zh.txt has 3 lines",
        ),
        ("sections: [\n", ""),  # not YAML at all
        ("sections:\n  - {start: one, end: 3, title: {zh: a, en: a}}\n", "sections.0.start"),
    ],
)
def test_broken_section_map_names_file_and_field(tiny_knowledge: Path, sections: str, expected: str) -> None:
    map_path = tiny_knowledge / "course" / "sections.yaml"
    map_path.write_text(sections, encoding="utf-8")
    with pytest.raises(KnowledgeError) as caught:
        load_chunks(tiny_knowledge)
    message = str(caught.value)
    assert message.startswith(f"{map_path}: "), message
    assert expected in message
    assert "\n" not in message


# --- the index: builds once, rebuilds when content or model change --------------------------------


def _settings(tmp_path: Path) -> Settings:
    return Settings(SPINBOT_HOME=str(tmp_path / "home"))  # type: ignore[call-arg]


def test_second_ensure_reuses_the_index(tmp_path: Path, tiny_knowledge: Path) -> None:
    embed = FakeEmbeddingModel()
    first = KnowledgeIndex(_settings(tmp_path), embed, tiny_knowledge)
    assert not first.is_current()
    report = first.ensure()
    assert report.built and report.chunks == 5
    assert sum(len(c) for c in embed.calls) == 5
    assert first.is_current()

    embed.calls.clear()
    second = KnowledgeIndex(_settings(tmp_path), embed, tiny_knowledge)
    again = second.ensure()
    assert not again.built
    assert again.fingerprint == report.fingerprint
    assert embed.calls == [], "an up-to-date index must not re-embed anything"
    assert second.search("price objection value", k=1)[0].source == "concepts/objections.en.md#Pricing"


def test_changing_a_knowledge_file_triggers_a_rebuild(tmp_path: Path, tiny_knowledge: Path) -> None:
    before = KnowledgeIndex(_settings(tmp_path), FakeEmbeddingModel(), tiny_knowledge)
    before.ensure()
    note = tiny_knowledge / "concepts" / "trust.zh.md"
    note.write_text(note.read_text(encoding="utf-8") + "\n信任需要时间。\n", encoding="utf-8")
    after = KnowledgeIndex(_settings(tmp_path), FakeEmbeddingModel(), tiny_knowledge)
    assert after.fingerprint != before.fingerprint
    assert not after.is_current()
    assert after.ensure().built
    assert KnowledgeIndex(_settings(tmp_path), FakeEmbeddingModel(), tiny_knowledge).is_current()
    assert "信任需要时间" in after.search("信任需要时间", k=1)[0].text


def test_changing_the_embedding_model_triggers_a_rebuild(tmp_path: Path, tiny_knowledge: Path) -> None:
    first = KnowledgeIndex(_settings(tmp_path), FakeEmbeddingModel(name="embed-a"), tiny_knowledge)
    first.ensure()
    other = KnowledgeIndex(_settings(tmp_path), FakeEmbeddingModel(name="embed-b"), tiny_knowledge)
    assert other.fingerprint != first.fingerprint
    assert other.ensure().built
    # The old model's index is now stale: switching back rebuilds again.
    assert not first.is_current()


def test_rebuild_forces_a_build(tmp_path: Path, tiny_knowledge: Path) -> None:
    embed = FakeEmbeddingModel()
    index = KnowledgeIndex(_settings(tmp_path), embed, tiny_knowledge)
    index.ensure()
    embed.calls.clear()
    report = index.ensure(rebuild=True)
    assert report.built
    assert sum(len(c) for c in embed.calls) == 5
    assert len(index.search("objections", k=10)) == 5, "a rebuild replaces the collection, never duplicates it"


def test_search_returns_k_passages_with_source_and_score(tmp_path: Path, tiny_knowledge: Path) -> None:
    index = KnowledgeIndex(_settings(tmp_path), FakeEmbeddingModel(), tiny_knowledge)
    passages = index.search("objections caused by pitching too early", k=3)  # builds on first use
    assert len(passages) == 3
    assert passages[0].source == "concepts/objections.en.md#Preventing objections"
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)
    for p in passages:
        assert p.score > 0 and p.source and p.title and p.language in ("zh", "en")
        assert p.text.startswith(p.title + "\n")
        data = p.to_json()
        assert set(data) >= {"text", "source", "score", "title", "language"}
    assert len(index.search("objections", k=50)) == 5  # never more than there are chunks


# --- the real index (built once per session) ------------------------------------------------------


def test_chinese_question_finds_the_implication_notes(real_index: KnowledgeIndex) -> None:
    passages = real_index.search("什么是暗示问题?", k=4)
    assert len(passages) == 4
    assert "暗示问题" in passages[0].text
    assert passages[0].source.startswith("concepts/implication-questions.zh.md")


def test_english_question_finds_the_chinese_course_wording(real_index: KnowledgeIndex) -> None:
    passages = real_index.search("Which customer type wants a bigger cake?", k=4)
    assert any("更大的蛋糕" in p.text for p in passages), [p.source for p in passages]


def test_english_question_finds_a_course_passage(real_index: KnowledgeIndex) -> None:
    passages = real_index.search("Which customer type wants a bigger cake?", k=4)
    assert any(p.source.startswith("course/") and "更大的蛋糕" in p.text for p in passages)


@pytest.mark.parametrize(
    ("term", "source"),
    [
        ("易受伤害之处", "course/spin-course-zh.txt#L50-L58"),  # the dense ranking alone misses this one
        ("德能勤绩", "course/spin-course-zh.txt#L33-L46"),
        ("卖出去才是硬道理", "course/spin-course-zh.txt#L201-L210"),
    ],
)
def test_hybrid_retrieval_finds_exact_course_terms(real_index: KnowledgeIndex, term: str, source: str) -> None:
    best = real_index.search(term, k=4)[0]
    assert best.source == source
    assert term in best.text.replace(" ", "")


def test_best_similarity_separates_on_and_off_topic(real_index: KnowledgeIndex) -> None:
    on_topic = real_index.best_similarity("什么是暗示问题?")
    off_topic = real_index.best_similarity("How do I cook pasta?")
    assert on_topic > off_topic
