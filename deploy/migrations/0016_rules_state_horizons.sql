-- Member states written before this version do not say what their pruning already forgot:
-- day counters older than two days (engagement caps) and orders older than 12 months
-- (a refund's replay of the tier). Each existing state gets the moments from which its
-- data is certainly complete, so a late event or a refund is decided without the missing
-- part (services/rules/engagement_rules.py `counted`, tiers.py `after_refund`) rather
-- than as if nothing had been there. States written from now on keep them themselves.

UPDATE rules_member_state
SET state = (state::jsonb || jsonb_build_object(
        'counters_since', to_char(current_date - 1, 'YYYY-MM-DD'),
        'spend_since', to_char((now() - interval '12 months') AT TIME ZONE 'UTC',
                               'YYYY-MM-DD"T"HH24:MI:SS"Z"')))::json
WHERE NOT (state::jsonb ? 'spend_since');
