"""The test suite as a package, so helpers import as `from tests.dnsserver import dns_server`.

tests/ is also put on sys.path, because some test modules import their helpers by bare name
(`import fakeprimary`, `from conftest import make_config`), which a package alone would break.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
