"""Event contracts shared by every service (CONTRACT.md is the source of truth).

Every model tolerates fields it does not know, as the contract lets producers add them:
inbound models (activity) keep them, internal models (grants, ledger events) ignore them;
mypy's pydantic plugin refuses unknown fields where our own code builds a model.
"""
