"""The teacher mode (`teacher.mode`) as a type, and what each mode needs and can do.

The driver validates a run's config with these facts before Ray starts, so this module imports
nothing heavy; the source classes that implement the modes (`student_trainer.teacher.sources`,
registry `SOURCES`) read the same facts from their `mode` instead of restating them. Configs,
YAML, flags and provenance keep writing the plain strings ("remote"): a `str` Enum compares and
hashes as its value, and `to_plain` writes `.value`.
"""
from __future__ import annotations

from enum import Enum


class TeacherMode(str, Enum):
    """Where a run's teacher outputs come from (as Ray's `ProxyLocation(str, Enum)`).

    `none`: no teacher; `inline`: the teacher loaded in each student worker; `remote`: the Serve
    pool; `cache`: a precomputed embedding cache, no teacher running; `hybrid`: cache hits, misses
    from the pool appended to the cache.
    """

    NONE = "none"
    INLINE = "inline"
    REMOTE = "remote"
    CACHE = "cache"
    HYBRID = "hybrid"

    def __str__(self) -> str:  # f-strings, argparse choices and messages show what users write
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every mode as users write it, in definition order."""
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: str | TeacherMode, where: str = "teacher.mode") -> TeacherMode:
        """The mode `value` names; ValueError naming the field `where` and the valid modes."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{where} {value!r}: expected one of {cls.values()}") from None

    @property
    def gives_outputs(self) -> bool:
        """The student gets teacher outputs for its batches (every mode but none)."""
        return self is not TeacherMode.NONE

    @property
    def loads_teacher(self) -> bool:
        """The teacher runs inside each student worker, loaded from `teacher.teacher`."""
        return self is TeacherMode.INLINE

    @property
    def needs_app(self) -> bool:
        """A running Serve app (the teacher pool, `teacher.app_name`) answers the run."""
        return self in (TeacherMode.REMOTE, TeacherMode.HYBRID)

    @property
    def reads_cache(self) -> bool:
        """Reads an embedding cache (`teacher.cache_path`)."""
        return self in (TeacherMode.CACHE, TeacherMode.HYBRID)

    @property
    def writes_cache(self) -> bool:
        """Appends the pool's answers to its cache: the cache may start missing or empty, lies under
        the run's write roots, and its rows are picked by the app's fingerprint."""
        return self is TeacherMode.HYBRID

    @property
    def cache_only(self) -> bool:
        """Every output from the cache, with no teacher running to fill a gap or say whose rows to
        read: an empty cache stops the run, and `cache_teacher` picks a teacher of a shared root."""
        return self.reads_cache and not self.needs_app

    @property
    def can_lose_teacher(self) -> bool:
        """The teacher may stop answering mid-run (a pool redeployed or down): the run then
        checkpoints and stops, and every rank must agree each step that it answered."""
        return self.needs_app

    @property
    def chooses_answer_dtype(self) -> bool:
        """A teacher computes this run's answers, so the run may ask for them in an answer dtype
        (`teacher.answer_dtype`); a `cache` run reads rows in the dtype they were stored in."""
        return self.loads_teacher or self.needs_app

    @property
    def computes_centroids(self) -> bool:
        """A running teacher that can embed Embed-KD's class centroids when none are given."""
        return self.loads_teacher or self.needs_app
