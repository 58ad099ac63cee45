"""What a translation could not do, or did differently from what the config says,
per proxy: ``meshlet status`` shows it next to the proxy's sync state."""

from __future__ import annotations

from dataclasses import dataclass, field

INFO = "info"
WARNING = "warning"
ERROR = "error"
# Kept per proxy; more means the same mistake repeated, which the first ones show.
MAX_NOTES = 200


@dataclass(frozen=True, slots=True)
class Note:
    level: str
    resource: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"level": self.level, "resource": self.resource, "message": self.message}

    def __str__(self) -> str:
        where = f"{self.resource}: " if self.resource else ""
        return f"{self.level}: {where}{self.message}"


@dataclass
class TranslationStatus:
    node_id: str
    notes: list[Note] = field(default_factory=list)
    dropped: int = 0

    def add(self, level: str, resource: str, message: str) -> None:
        note = Note(level, resource, message)
        if note in self.notes:
            return
        if len(self.notes) >= MAX_NOTES:
            self.dropped += 1
            return
        self.notes.append(note)

    def info(self, resource: str, message: str) -> None:
        self.add(INFO, resource, message)

    def warning(self, resource: str, message: str) -> None:
        self.add(WARNING, resource, message)

    def error(self, resource: str, message: str) -> None:
        self.add(ERROR, resource, message)

    def of_level(self, level: str) -> list[Note]:
        return [n for n in self.notes if n.level == level]

    def as_dict(self) -> dict[str, object]:
        return {"node_id": self.node_id, "notes": [n.as_dict() for n in self.notes], "dropped": self.dropped}
