"""Selection rules: which images a run takes, decided from header attributes alone (no pixel
is read), before anything is fetched or ingested (invariant 9: only what the model is for).

A rule names a DICOM attribute by its keyword and a test:

    Modality in [CR, DX]            one of the listed values
    Modality not in [CT, MR]        none of them
    BodyPartExamined == CHEST       exactly this value
    ViewPosition != LL              anything but this value
    ViewPosition exists             present, whatever its value
    ViewPosition in [PA, AP] if present     the rule holds too when the attribute is absent

An image is selected when every rule holds. Values compare case-insensitively with
surrounding spaces dropped (DICOM code strings are upper case; a typed "chest" means CHEST).
A multi-valued attribute (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) matches `==` and `in`
when any of its values does, and `!=` and `not in` when none does.

Absent attributes (the documented choice): a DICOM without the attribute, or with it empty
(type 2), is not selected, with the reason "BodyPartExamined absent": an archive's
unlabelled studies are exactly the ones nobody checked. `if present` opts a rule out of it.
Inputs that carry no DICOM header (PNG, JPEG, TIFF, SVS, zarr) have no DICOM attributes to
test: rules do not apply to them (the checks at ingest, channels and size, still do).

Rules are recorded with the run (its provenance, Prefect's parameters): a rule on an
attribute that identifies the patient or the visit (PatientID, StudyDate, ...) is refused
(invariant 8). A skip reason quotes the attribute's value only when it is a code or a
number (VR CS, IS, DS, US, ...): for free text it says "ProtocolName did not match".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.identifiers import is_identifier

Header = Mapping[str, Sequence[str]]  # keyword -> values (absent keys: attribute absent)
EVERY_IMAGE = "all"  # `--select all`: no rules
OPS = ("==", "!=", "not in", "in", "exists")
_SHOWN_VRS = frozenset({"CS", "IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "AS"})
_RULE = re.compile(
    r"^\s*(?P<keyword>[A-Za-z][A-Za-z0-9]*)\s*"
    r"(?P<op>==|!=|not\s+in\b|in\b|exists\b)\s*(?P<rest>.*?)\s*$"
)
_IF_PRESENT = re.compile(r"\s+if\s+present\s*$", re.IGNORECASE)
_VALUE = re.compile(r"""^(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\[\],"']+))$""")


@dataclass(frozen=True)
class Rule:
    """One test of one DICOM attribute (see the module docstring)."""

    keyword: str
    op: str
    values: tuple[str, ...] = ()
    if_present: bool = False

    def __str__(self) -> str:
        if self.op == "exists":
            test = "exists"
        elif self.op in ("in", "not in"):
            test = f"{self.op} [{', '.join(self.values)}]"
        else:
            test = f"{self.op} {self.values[0]}"
        return f"{self.keyword} {test}{' if present' if self.if_present else ''}"

    def fails(self, header: Header) -> str | None:
        """None when the rule holds for `header`, else why not ("BodyPartExamined=EXTREMITY",
        "ViewPosition absent")."""
        found = [v.strip().upper() for v in header.get(self.keyword, ()) if str(v).strip()]
        if not found:
            return None if self.if_present else f"{self.keyword} absent"
        wanted = {v.upper() for v in self.values}
        holds = {
            "exists": True,
            "==": any(v in wanted for v in found),
            "in": any(v in wanted for v in found),
            "!=": not any(v in wanted for v in found),
            "not in": not any(v in wanted for v in found),
        }[self.op]
        return None if holds else shown(self.keyword, found)


def parse_rule(text: str) -> Rule:
    """A rule from its text; ConfigError naming the text and what is wrong."""
    body = _IF_PRESENT.sub("", text)
    match = _RULE.match(body)
    if not match:
        raise ConfigError(f"selection rule {text!r}: expected 'Keyword == VALUE', 'Keyword != VALUE', "
                          "'Keyword in [A, B]', 'Keyword not in [A, B]' or 'Keyword exists', "
                          "optionally followed by 'if present'")  # fmt: skip
    keyword, op, rest = match["keyword"], " ".join(match["op"].split()), match["rest"]
    _check_keyword(keyword, text)
    if op == "exists":
        if rest:
            raise ConfigError(f"selection rule {text!r}: nothing may follow 'exists' (got {rest!r})")
        values: tuple[str, ...] = ()
    elif op in ("in", "not in"):
        if not (rest.startswith("[") and rest.endswith("]")):
            raise ConfigError(f"selection rule {text!r}: '{op}' takes a list in brackets, e.g. [CR, DX]")
        values = tuple(_value(v, text) for v in rest[1:-1].split(","))
    else:
        values = (_value(rest, text),)
    return Rule(keyword, op, values, if_present=body != text)


def parse_rules(texts: Iterable[str]) -> tuple[Rule, ...]:
    """The rules of `texts` (`all` alone, or nothing: no rules)."""
    return tuple(parse_rule(t) for t in texts if t.strip().lower() != EVERY_IMAGE)


def rules_for(requested: Sequence[str] | None, card_default: Sequence[str]) -> tuple[Rule, ...]:
    """The run's rules: those it asks for (`--select`), else the model card's default."""
    return parse_rules(card_default if requested is None else requested)


def not_selected(rules: Sequence[Rule], header: Header | None) -> str | None:
    """None when every rule holds (or the input has no DICOM header: `header` None), else
    the skip reason, "not selected: BodyPartExamined=EXTREMITY" (every failing rule)."""
    if header is None:
        return None
    failing = [why for rule in rules if (why := rule.fails(header)) is not None]
    return f"not selected: {', '.join(dict.fromkeys(failing))}" if failing else None


def keywords(rules: Iterable[Rule]) -> tuple[str, ...]:
    """The attributes `rules` read, each once, in order."""
    return tuple(dict.fromkeys(rule.keyword for rule in rules))


def required_values(rules: Iterable[Rule], keyword: str) -> tuple[str, ...] | None:
    """The values `keyword` must take under `rules` (an `==` or `in` rule that applies to
    every image), for a server-side query; None when no such rule limits it."""
    for rule in rules:
        if rule.keyword == keyword and rule.op in ("==", "in") and not rule.if_present:
            return tuple(v.upper() for v in rule.values)
    return None


def expand_files(items: Iterable[str]) -> tuple[str, ...]:
    """`--select` values with each `@FILE` replaced by the rules in FILE (one per line,
    blank lines and '#' comments ignored)."""
    expanded: list[str] = []
    for item in items:
        if not item.startswith("@"):
            expanded.append(item)
            continue
        path = Path(item[1:]).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the selection rules ({exc.strerror or exc})") from None
        expanded += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return tuple(expanded)


def shown(keyword: str, values: Sequence[str]) -> str:
    """`Keyword=VALUE` for a code or number; for anything else (free text, dates, UIDs:
    they may identify the patient) only that it did not match."""
    from pydicom import datadict

    tag = datadict.tag_for_keyword(keyword)
    vr = datadict.dictionary_VR(tag) if tag is not None else ""
    if vr in _SHOWN_VRS and not is_identifier(keyword):
        return f"{keyword}=" + "\\".join(values)
    return f"{keyword} did not match"


def _check_keyword(keyword: str, text: str) -> None:
    """A known DICOM keyword that does not identify anyone: a rule is stored with the run
    (provenance, Prefect's parameters), so a rule on PatientID would carry the ID there."""
    from pydicom import datadict

    if datadict.tag_for_keyword(keyword) is None:
        raise ConfigError(f"selection rule {text!r}: {keyword!r} is not a DICOM attribute keyword "
                          "(e.g. Modality, BodyPartExamined, ViewPosition)")  # fmt: skip
    if is_identifier(keyword):
        raise ConfigError(f"selection rule on {keyword}: it identifies the patient or the visit, and rules "
                          "are recorded with the run; select by what the image is (Modality, "
                          "BodyPartExamined, ViewPosition, ImageType, ...)")  # fmt: skip


def _value(raw: str, text: str) -> str:
    match = _VALUE.match(raw.strip())
    if not match or not (value := next(v for v in match.groupdict().values() if v is not None).strip()):
        raise ConfigError(f"selection rule {text!r}: bad value {raw.strip()!r}")
    return value
