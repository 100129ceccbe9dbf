"""Every use of a library's private names, one module per library, each use commented.

The relay keeps aiosmtpd and aiosmtplib (the chosen stack) but does some things they do not
offer (a faster per-connection set-up, a DATA reader that keeps bytes exact, a body written
without line rewriting). Those reach into names the libraries do not promise to keep; gathered
here, against the exact versions pinned in pyproject.toml, a dependency bump is a deliberate
commit that re-reads these modules, and the parity tests fail before a session does.
"""
