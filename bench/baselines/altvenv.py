"""The baselines' own virtualenv (bench/.venv-alt): Quix Streams pins confluent-kafka and pydantic to
ranges Meterstream's environment must not be held to, and psycopg is not a Meterstream dependency.
Created on first use with ``python -m venv`` and pip; later runs reuse it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import log

VENV = Path(__file__).resolve().parent.parent / ".venv-alt"
#: genai-prices at Meterstream's exact pin, so both price from the same data.
REQUIREMENTS = ("quixstreams>=3.20,<4", "genai-prices==0.2.3", "psycopg[binary]>=3.1,<4", "orjson>=3.10")


def python() -> Path | None:
    """The venv's interpreter, creating the venv if needed; None (logged) if it cannot be built."""
    interpreter = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if interpreter.exists() and stamp.exists():
        return interpreter
    log(f"creating the baselines' venv {VENV} (quixstreams, genai-prices, psycopg; once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True)
        subprocess.run(
            [str(interpreter), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log(f"cannot build the baselines' venv ({exc}): {detail.decode(errors='replace')[-500:]}")
        return None
    stamp.write_text("\n".join(REQUIREMENTS))
    return interpreter


def has_module(interpreter: Path, module: str) -> bool:
    result = subprocess.run([str(interpreter), "-c", f"import {module}"], capture_output=True, check=False)
    return result.returncode == 0
