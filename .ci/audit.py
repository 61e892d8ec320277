"""`make audit`: pip-audit over the installed dependencies (the project itself is skipped),
against PyPI's advisory data. Fails on any known vulnerability; says how many packages it
could audit, because pip-audit skips a package PyPI cannot answer for (a private mirror, or
no network) and would otherwise report "no known vulnerabilities" about nothing.

AUDIT_REQUIRE_DATA=1 also fails when not one package could be audited."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main() -> int:
    command = [sys.executable, "-m", "pip_audit", "--skip-editable", "--format", "json"]
    run = subprocess.run(  # noqa: S603 (our own interpreter, fixed arguments)
        [*command, "--progress-spinner", "off"], capture_output=True, text=True
    )
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        print(run.stdout, run.stderr, sep="\n", file=sys.stderr)
        print("error: pip-audit did not produce a report", file=sys.stderr)
        return 2
    deps = report["dependencies"]
    skipped = [d for d in deps if "skip_reason" in d]
    found = [(d, v) for d in deps for v in d.get("vulns", [])]
    audited = len(deps) - len(skipped)
    for d, v in found:
        fixes = ", ".join(v.get("fix_versions", [])) or "no fix yet"
        print(f"VULNERABLE {d['name']} {d['version']}: {v['id']} (fixed in {fixes})")
    print(
        f"pip-audit: {audited} of {len(deps)} packages audited, {len(found)} known vulnerabilities"
    )
    if skipped:
        print(f"  skipped {len(skipped)}: {skipped[0]['skip_reason']} …")
    if found:
        return 1
    if audited == 0:
        print(
            "WARNING: no package could be audited (PyPI's per-release advisory API is not "
            "reachable from here); this run proves nothing about vulnerabilities",
            file=sys.stderr,
        )
        return 1 if os.environ.get("AUDIT_REQUIRE_DATA") == "1" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
