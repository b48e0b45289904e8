"""Developer and CI sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`.

No session pins a Python: each runs on the interpreter nox runs under (3.11 or newer), so a
machine with one Python does not fail on the versions it lacks. Dependencies come from the
dependency groups in pyproject.toml, read by nox itself so that any pip or uv works.
"""

from __future__ import annotations

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "client", "lint", "typecheck"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
CLIENT = "clients/python"  # sessionmgr-client, a distribution of its own


def install_groups(session: nox.Session, *groups: str, project: bool = True) -> None:
    packages = nox.project.dependency_groups(PYPROJECT, *groups)
    session.install(*(("-e", ".") if project else ()), *packages)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite with coverage; needs redis-server on PATH (the fixtures start their own).

    `nox -s tests -- -m mongodb` runs the real-MongoDB tests (Docker or
    SESSIONMGR_TEST_MONGODB_URI); other arguments go to pytest as well.
    """
    install_groups(session, "tests")
    session.run(
        "pytest",
        "--cov=sessionmgr",
        "--cov-report=term-missing",
        "--cov-fail-under=85",
        *session.posargs,
    )


@nox.session
def client(session: nox.Session) -> None:
    """The Python client (clients/python, installed editable) against a real `sessionmgr
    serve` (one, and three sharing one Redis and MongoDB) and redis-server, with the client's
    coverage; about a minute."""
    install_groups(session, "tests")
    session.install("-e", CLIENT)
    session.run(
        "pytest",
        "-p",
        "no:cacheprovider",
        "--cov=sessionmgr_client",
        "--cov-report=term-missing",
        "--cov-fail-under=85",
        f"{CLIENT}/tests",
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    install_groups(session, "lint", project=False)
    session.run("ruff", "check", *session.posargs)
    session.run("ruff", "format", "--check", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    install_groups(session, "typecheck")
    session.install("-e", CLIENT)
    session.run("mypy", *session.posargs)
    # the client, strict as well, on its own (its imports are not the server's)
    session.run("mypy", f"{CLIENT}/src/sessionmgr_client", f"{CLIENT}/examples")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """The benchmark of issue 6 (never in CI): stack on loopback, wrk load, docs/benchmarks.md.

    Needs redis-server, wrk and taskset on PATH (apt-get install redis-server wrk). Arguments
    go to `python -m bench.run`: `nox -s bench -- --quick` is a smoke run, `--profile` adds
    py-spy profiles of the hot GET and the update under bench/profiles/.

    The peer scenario (issue 16, `bench/peer.py`: google-adk's DatabaseSessionService) needs a
    PostgreSQL: `--peer-url postgresql+asyncpg://...` or $BENCH_PEER_URL, by default
    postgres@127.0.0.1:5432/test; when none answers, the run says so and skips the peer.
    """
    install_groups(session, "bench")
    session.run("python", "-m", "bench.run", *session.posargs)


@nox.session(default=False)
def faults(session: nox.Session) -> None:
    """The long fault soak (never in CI, ~25 min): each class of MongoDB error for 10 s and
    120 s under steady writes, with the rest of the fault-injection suite.

    CI runs the short version (1 s per class, one 10 s outage) inside `nox -s tests`.
    """
    install_groups(session, "tests")
    session.run(
        "pytest",
        "tests/integration/faults",
        *session.posargs,
        env={"SESSIONMGR_FAULTS_LONG": "1"},
    )
