"""JUnit XML reports for ``verify --junit FILE``: one test case per file checked, written atomically.

The layout is the one CI systems read (GitHub Actions' test reporters, GitLab, Jenkins): ``<testsuites>``
holding one ``<testsuite>`` per manifest (or per ``verify`` run), one ``<testcase>`` per file, with a
``<failure>`` naming the reason or ``<skipped>`` where nothing could be compared.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .fileio import write_bytes_atomic
from .manifest import MalformedLine
from .verify import FileCheck

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class JunitCase:
    """One test case: ``outcome`` is ``passed``, ``failure`` or ``skipped``."""

    name: str
    outcome: str
    message: str = ""
    text: str = ""


@dataclass(frozen=True)
class JunitSuite:
    name: str
    cases: tuple[JunitCase, ...]


def cases_from_checks(checks: Iterable[FileCheck], malformed: Iterable[MalformedLine] = (), *,
                      strict: bool = False, source: str = "") -> tuple[JunitCase, ...]:
    """Test cases for ``checks`` (and, with ``strict``, a failing case per improperly formatted line)."""
    cases = []
    for check in checks:
        if check.status == "OK":
            cases.append(JunitCase(check.name, "passed"))
        elif check.status == "FAILED":
            cases.append(JunitCase(check.name, "failure", "computed checksum did NOT match",
                                   "\n".join(filter(None, [check.detail, check.note]))))
        elif check.status == "MISSING":
            cases.append(JunitCase(check.name, "failure", f"FAILED open or read: {check.detail}", check.detail))
        else:
            cases.append(JunitCase(check.name, "skipped", check.detail or check.status.lower()))
    if strict:
        cases.extend(JunitCase(f"{source} line {bad.line}", "failure", bad.reason) for bad in malformed)
    return tuple(cases)


def _clean(text: str) -> str:
    """``text`` as XML can hold it: undecodable bytes and control characters become visible escapes."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def junit_xml(suites: Sequence[JunitSuite], *, name: str = "gptq-tools verify") -> bytes:
    """The JUnit XML document for ``suites``."""
    root = ET.Element("testsuites", name=name)
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for suite in suites:
        counts = {"tests": len(suite.cases),
                  "failures": sum(1 for c in suite.cases if c.outcome == "failure"),
                  "skipped": sum(1 for c in suite.cases if c.outcome == "skipped")}
        element = ET.SubElement(root, "testsuite", name=_clean(suite.name), errors="0",
                                **{k: str(v) for k, v in counts.items()})
        for case in suite.cases:
            item = ET.SubElement(element, "testcase", name=_clean(case.name), classname=_clean(suite.name))
            if case.outcome != "passed":
                tag = "failure" if case.outcome == "failure" else "skipped"
                child = ET.SubElement(item, tag, message=_clean(case.message))
                child.text = _clean(case.text) or None
        for key, value in counts.items():
            totals[key] += value
    root.attrib.update({k: str(v) for k, v in totals.items()}, errors="0")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str | os.PathLike[str], suites: Sequence[JunitSuite]) -> None:
    """Write the JUnit XML report for ``suites`` to ``path`` atomically (replacing an earlier report).

    The report's folder is created if needed (CI jobs name paths like ``reports/verify.xml``).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, junit_xml(suites), force=True)
