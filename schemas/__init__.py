"""Event contracts shared by every service (CONTRACT.md is the source of truth).

Inbound models (activity) tolerate unknown fields so upstream systems can add fields
without breaking us; internal models (grants, ledger events) forbid them so a typo in our
own code fails loudly.
"""
