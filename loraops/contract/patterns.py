"""Content patterns: encoding, control characters, secrets and e-mail addresses, with the reasons shown."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from loraops.contract.facts import SplitFacts, Turns, turn_name
from loraops.data.batches import RowBatch

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

# All but tab, newline and CR, plus U+FFFD (what invalid UTF-8 decodes to). RE2 spelling; the GX suites'
# ``encoding`` regex is the same set in Python's (a literal U+FFFD keeps pandas on pyarrow's RE2 path).
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x{80}-\x{9f}\x{fffd}]"
GX_CONTROL_CHARS = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f\ufffd]"  # Python's re; U+FFFD as itself
SECRET_PATTERNS = {
    "OpenAI-style API key ('sk-...')": r"\bsk-[A-Za-z0-9_\-]{20,}",
    "AWS access key id ('AKIA...')": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token ('ghp_...')": r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,})",
    "Slack token ('xox.-...')": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "Google API key ('AIza...')": r"\bAIza[0-9A-Za-z_\-]{35}",
    "private key block": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
}
EMAIL_PATTERN = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
ASCII_WHITESPACE_RUN = r"[\t\n\x0b\x0c\r\x1c-\x1f ]+"  # what ``str.split()`` splits ASCII text on


def ascii_boundaries(pattern: str) -> str:
    """``pattern`` with ``\\b`` spelled in ASCII, as RE2 (pyarrow) reads it.

    Python's ``\\b`` is Unicode-aware and makes pandas run a regex with Python's ``re`` on non-ASCII
    text, ~10x slower than pyarrow's RE2; the GX suites' ``secrets`` regex is this spelling
    (``GX_SECRETS``), so the suite, the scan and pandas agree on every row.
    """
    start, end = r"(?:^|[^A-Za-z0-9_])", r"(?:[^A-Za-z0-9_]|\Z)"
    return re.sub(r"\\b(.*)\\b$", lambda m: rf"\b{m.group(1)}{end}", pattern).replace(r"\b", start)


# One pass finds the few ASCII turns any rule or the normalisation must look at closely: control
# and whitespace characters other than a single inner space (``str.split`` would change them),
# and anything a secret or e-mail pattern could match. Non-ASCII turns are always looked at.
UNUSUAL = "|".join([r"[\x00-\x1f\x7f]|^ | $|  ", *SECRET_PATTERNS.values(), EMAIL_PATTERN])
GX_SECRETS = "|".join(f"(?:{ascii_boundaries(pattern)})" for pattern in SECRET_PATTERNS.values())


def unusual_turns(content: pa.Array) -> np.ndarray:
    """Indices of the turns that are not plain ASCII text (see ``UNUSUAL``)."""
    import numpy as np
    import pyarrow.compute as pc

    unusual = pc.or_(pc.invert(pc.string_is_ascii(content)), pc.match_substring_regex(content, UNUSUAL))
    return np.flatnonzero(pc.fill_null(unusual, False).to_numpy(zero_copy_only=False))


def content_patterns(
    facts: SplitFacts, batch: RowBatch, turns: Turns, well_formed: np.ndarray, unusual: np.ndarray
) -> None:
    import numpy as np
    import pyarrow.compute as pc

    suspects = turns.content.take(unusual)

    def per_row(pattern: str) -> np.ndarray:
        hits = np.zeros(len(turns.parent), dtype=bool)
        found = pc.fill_null(pc.match_substring_regex(suspects, pattern), False).to_numpy(zero_copy_only=False)
        hits[unusual[found]] = True
        return turns.any_per_row(hits) & well_formed

    lines = batch.lines
    invalid = np.zeros(len(lines), dtype=bool)
    invalid[list(batch.encoding)] = True
    encoding = invalid | per_row(CONTROL_CHARS)
    facts.add("encoding", encoding)
    facts.explain("encoding", lines, encoding, lambda row: batch.encoding.get(row) or _control_reason(batch, row))

    secrets = per_row("|".join(f"(?:{pattern})" for pattern in SECRET_PATTERNS.values()))
    facts.add("secrets", secrets)
    facts.explain("secrets", lines, secrets, lambda row: _secret_reason(batch, row))
    emails = per_row(EMAIL_PATTERN)
    facts.add("emails", emails)
    facts.explain("emails", lines, emails, lambda row: _email_reason(batch, row))


def _control_reason(batch: RowBatch, row: int) -> str:
    control = re.compile(GX_CONTROL_CHARS)
    for index, turn in enumerate(batch.messages[row].as_py()):
        found = control.search(turn["content"] or "")
        if found:
            char = found.group()
            where = _byte_in_line(batch, row, char)
            what = "replacement character" if char == "\ufffd" else "control character"
            return (
                f"{what} U+{ord(char):04X} in {turn_name(index, turn['role'], batch.format)} "
                f"at character {found.start()}{where}"
            )
    return "control character"


def _byte_in_line(batch: RowBatch, row: int, char: str) -> str:
    """Where ``char`` sits in the raw line (as itself or as a \\u escape), when the file has lines."""
    if batch.offsets is None:
        return ""
    with open(batch.path, "rb") as handle:
        handle.seek(int(batch.offsets[row]))
        raw = handle.readline()
    forms = [char.encode("utf-8"), f"\\u{ord(char):04x}".encode(), f"\\u{ord(char):04X}".encode()]
    positions = [raw.find(form) for form in forms if raw.find(form) >= 0]
    if not positions:
        return ""
    return f" (byte {min(positions)} of the line, file offset {int(batch.offsets[row]) + min(positions)})"


def _secret_reason(batch: RowBatch, row: int) -> str:
    for index, turn in enumerate(batch.messages[row].as_py()):
        for kind, pattern in SECRET_PATTERNS.items():
            found = re.search(pattern, turn["content"] or "")
            if found:
                shown = found.group()[:6] + "…"
                return f"{kind} {shown!r} in {turn_name(index, turn['role'], batch.format)}"
    return "credential pattern"


def _email_reason(batch: RowBatch, row: int) -> str:
    for index, turn in enumerate(batch.messages[row].as_py()):
        found = re.search(EMAIL_PATTERN, turn["content"] or "")
        if found:
            local, _, domain = found.group().partition("@")
            return f"e-mail address '{local[:1]}***@{domain}' in {turn_name(index, turn['role'], batch.format)}"
    return "e-mail address"
