"""`adqueue sql`: one read statement, checked by a real SQL tokenizer, run on a connection the
database itself keeps read-only, with a row cap and a time limit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlparse import tokens as T
from sqlparse.engine import FilterStack
from sqlparse.exceptions import SQLParseError
from sqlparse.sql import Statement, Token

from adqueue.core.config import DEFAULT_SQL_MAX_ROWS, DEFAULT_SQL_TIMEOUT_S
from adqueue.core.errors import AdqueueError, ReadOnlyViolation
from adqueue.store.session import make_engine

_READ_VERBS = frozenset({"SELECT", "WITH", "EXPLAIN", "VALUES", "SHOW", "TABLE"})
# Every other statement PostgreSQL or SQLite runs: refused by name, as a write or a change to the
# session. A first word that is none of these is no statement at all (a typo: "selec ..."), and
# is told so rather than called a write.
_OTHER_STATEMENTS = frozenset({
    "ABORT", "ALTER", "ANALYZE", "ATTACH", "BEGIN", "CALL", "CHECKPOINT", "CLOSE", "CLUSTER", "COMMENT", "COMMIT",
    "COPY", "CREATE", "DEALLOCATE", "DECLARE", "DELETE", "DETACH", "DISCARD", "DO", "DROP", "END", "EXECUTE",
    "FETCH", "GRANT", "IMPORT", "INSERT", "LISTEN", "LOAD", "LOCK", "MERGE", "MOVE", "NOTIFY", "PRAGMA", "PREPARE",
    "REASSIGN", "REFRESH", "REINDEX", "RELEASE", "REPLACE", "RESET", "REVOKE", "ROLLBACK", "SAVEPOINT", "SECURITY",
    "SET", "START", "TRUNCATE", "UNLISTEN", "UPDATE", "UPSERT", "VACUUM",
})
# What PostgreSQL's DECLARE ... CURSOR FOR accepts ("(" opens a parenthesized SELECT).
_STREAMED_VERBS = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})
# Calls a read may not make: set_config can take a superuser session back from pg_read_all_data
# (set_config('role', ...)) or lift its statement_timeout; the others run SQL text that
# check_read_only never sees (query_to_xml, ts_stat, ts_rewrite) or open another, writable
# connection (dblink*, matched by prefix).
_REFUSED_FUNCTIONS = frozenset({"set_config", "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
                                "ts_stat", "ts_rewrite"})


def check_read_only(statement: str) -> str:
    """The one read statement in `statement`, without its trailing ';' and comments.

    A real SQL tokenizer, so ';' and '--' inside string literals, quoted names and dollar quotes
    are data. The database refuses writes as well (a read-only session, a read-only SQLite file);
    this check gives the clear message and stops what only a tokenizer can see."""
    return _read_statement(statement)[0]


def _read_statement(statement: str) -> tuple[str, str]:
    """(the statement to run, its verb), or ReadOnlyViolation for anything but one read."""
    tokens = _single_statement(statement)
    first = _leading_word(tokens)
    verb = first.upper()
    if verb in _OTHER_STATEMENTS:
        raise ReadOnlyViolation(f"adqueue sql is read-only: {verb} statements are refused")
    if verb not in _READ_VERBS:
        reads = ", ".join(sorted(_READ_VERBS))
        raise AdqueueError(f"adqueue sql knows no statement that starts with {first!r} (a typo?): it runs one read "
                           f"statement, starting with one of {reads}")
    _refuse_writes_inside(tokens)
    _refuse_session_escapes(tokens)
    return "".join(token.value for token in tokens).lstrip(), verb


def _single_statement(statement: str) -> list[Token]:
    # Lexing and splitting only: sqlparse's grouping pass caps statements at 10,000 tokens (a
    # long IN list) and adds nothing these checks need.
    try:
        parsed = [_code_of(part) for part in FilterStack().run(statement)]
    except SQLParseError as exc:
        raise AdqueueError(f"adqueue sql cannot read this statement: {exc}") from None
    statements = [tokens for tokens in parsed if tokens]
    if not statements:
        raise ReadOnlyViolation("empty SQL statement")
    # The splitter keeps BEGIN ... END blocks whole: a ';' left inside is a second statement too.
    if len(statements) > 1 or any(token.match(T.Punctuation, ";") for token in statements[0]):
        raise ReadOnlyViolation("adqueue sql is read-only and runs one statement at a time")
    return statements[0]


def _code_of(statement: Statement) -> list[Token]:
    """The statement's tokens up to its last one that is not whitespace, a comment or ';'."""
    tokens = list(statement.flatten())
    while tokens and (_is_filler(tokens[-1]) or tokens[-1].match(T.Punctuation, ";")):
        tokens.pop()
    return tokens


def _is_filler(token: Token) -> bool:
    return token.is_whitespace or token.ttype in T.Comment


def _leading_word(tokens: list[Token]) -> str:
    # A parenthesis may open a read: "(SELECT ...) UNION (SELECT ...)".
    for token in tokens:
        if not (_is_filler(token) or token.match(T.Punctuation, "(")):
            return str(token.value)
    raise ReadOnlyViolation("empty SQL statement")


def _next_code(tokens: list[Token], index: int) -> Token | None:
    return next((token for token in islice(tokens, index + 1, None) if not _is_filler(token)), None)


def _is_call(tokens: list[Token], index: int) -> bool:
    following = _next_code(tokens, index)
    return following is not None and following.match(T.Punctuation, "(")


def _refuse_writes_inside(tokens: list[Token]) -> None:
    """A data-modifying CTE, EXPLAIN ANALYZE DELETE, SELECT ... FOR UPDATE or SELECT ... INTO
    starts with a read verb; the keyword inside gives it away."""
    for index, token in enumerate(tokens):
        changes = (token.ttype in T.DML and token.normalized != "SELECT") or token.ttype in T.DDL
        # replace(...) lexes as a DML keyword when a space precedes its parenthesis.
        if changes and not _is_call(tokens, index):
            raise ReadOnlyViolation(f"adqueue sql is read-only: statements containing {token.normalized} are refused")
        if token.match(T.Keyword, "INTO"):
            raise ReadOnlyViolation("adqueue sql is read-only: SELECT ... INTO (a new table) is refused")


def _refuse_session_escapes(tokens: list[Token]) -> None:
    """Calls that would let one read undo the session's limits or run SQL this check never saw."""
    for index, token in enumerate(tokens):
        if token.ttype in T.String.Symbol and index >= 2 and tokens[index - 1].value == "&" \
                and tokens[index - 2].value.upper() == "U":
            # U&"..." spells a name with escapes, hiding it from the list below.
            raise ReadOnlyViolation('adqueue sql is read-only: U&"..." names are refused; write names plainly')
        name = token.value.strip('"').lower() if token.ttype in T.Name or token.ttype in T.String.Symbol else ""
        if (name in _REFUSED_FUNCTIONS or name.startswith("dblink")) and _is_call(tokens, index):
            raise ReadOnlyViolation(f"adqueue sql is read-only: {name}() is refused")


@dataclass
class ReadOnlyResult:
    """The rows of one read statement; unpacks as (columns, rows)."""

    columns: list[str]
    rows: list[tuple]
    truncated: bool = False  # more rows followed the first max_rows

    def __iter__(self) -> Iterator[Any]:
        return iter((self.columns, self.rows))


def run_read_only(url: str, statement: str, *, max_rows: int | None = DEFAULT_SQL_MAX_ROWS,
                  timeout_s: float | None = DEFAULT_SQL_TIMEOUT_S) -> ReadOnlyResult:
    """Run one read statement on a read-only connection: at most `max_rows` rows (0 or None: all
    of them), stopped by the database after `timeout_s` seconds (None: no limit). Writes fail in
    the database itself too, and on PostgreSQL so do superuser-only functions where the session
    can drop to pg_read_all_data."""
    body, verb = _read_statement(statement)
    engine = make_engine(url, read_only=True, timeout_s=timeout_s)
    driver_error = engine.dialect.loaded_dbapi.Error
    try:
        with engine.connect() as connection:
            connection.begin()
            cursor = _execute(connection.connection.driver_connection, engine.dialect.name, body, verb)
            try:
                return _fetch(cursor, max_rows)
            finally:
                cursor.close()
                connection.rollback()
    except (DBAPIError, driver_error) as exc:
        raise _sql_error(exc, timeout_s) from None
    finally:
        engine.dispose()


def _execute(driver_connection: Any, dialect: str, body: str, verb: str) -> Any:
    """A driver cursor over `body`'s rows. Through the driver, not SQLAlchemy: no bind-parameter
    parsing of colons or percent signs in literals, and the protocol choices below."""
    if dialect != "postgresql":
        cursor = driver_connection.cursor()
        cursor.execute(body)  # sqlite3 itself refuses a second statement
        return cursor
    # Both paths use PostgreSQL's extended protocol, which refuses a second statement however
    # the text hides it. A server-side cursor streams rows, so a row cap bounds memory;
    # DECLARE takes only these verbs (not EXPLAIN or SHOW, whose output is small).
    if verb in _STREAMED_VERBS:
        cursor = driver_connection.cursor(name="adqueue_sql")
        cursor.execute(body)
    else:
        cursor = driver_connection.cursor()
        cursor.execute(body, prepare=True)
    return cursor


def _fetch(cursor: Any, max_rows: int | None) -> ReadOnlyResult:
    columns = [column[0] for column in cursor.description or ()]
    if cursor.description is None:
        return ReadOnlyResult(columns, [])
    if not max_rows:
        return ReadOnlyResult(columns, [tuple(row) for row in cursor.fetchall()])
    rows = [tuple(row) for row in cursor.fetchmany(max_rows)]
    return ReadOnlyResult(columns, rows, truncated=cursor.fetchone() is not None)


def _sql_error(exc: Exception, timeout_s: float | None) -> AdqueueError:
    """One line for the terminal from a driver error."""
    error = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if timeout_s and _timed_out(error, message):
        return AdqueueError(f"adqueue sql: the query ran past its {timeout_s:g} s limit (--timeout)")
    if any(word in message for word in ("read-only", "readonly", "query_only", "data-modifying")):
        return ReadOnlyViolation(f"adqueue sql is read-only: {message}")
    return AdqueueError(f"SQL error: {message}")


def _timed_out(error: BaseException, message: str) -> bool:
    # PostgreSQL: query_canceled by statement_timeout (not by an administrator's cancel).
    # SQLite: the progress handler that make_engine installs aborted the statement.
    return (getattr(error, "sqlstate", None) == "57014" and "statement timeout" in message) or message == "interrupted"
