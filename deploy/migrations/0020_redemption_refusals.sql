-- CONTRACT.md: "the same redemption_id again returns the first answer". A redemption
-- refused for the member's balance or the catalogue (409, 422) is kept with its answer
-- too, so that retrying the id answers the refusal again instead of redeeming later.
-- Rows before this migration were all redemptions made (201). A constant default adds the
-- column without rewriting the table.

ALTER TABLE ledger_redemptions ADD COLUMN status smallint NOT NULL DEFAULT 201;
