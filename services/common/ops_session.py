"""Server settings for the connections of ops work: `ledger rebuild`, `ledger verify`,
`rules simulate` and the rest of `ledgerctl`.

A DBA's `statement_timeout`, `lock_timeout` or `idle_in_transaction_session_timeout`
(set on the role or the database) is meant for the application's short statements. Ops
work is long by nature: a rebuild builds the read models in two statements over the
whole journal, a verify or a backtest reads it through one snapshot, and a rebuild waits
for a running verify. Under a 5 s timeout they failed halfway (cleanly, but never
finished), so their sessions lift the three. The rebuild's swap still sets its own
`lock_timeout`, locally, so it never holds the live tables long.
"""

from __future__ import annotations

from typing import Final

UNBOUNDED: Final = {
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
}
