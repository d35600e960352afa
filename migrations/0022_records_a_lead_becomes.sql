-- Which records a lead becomes is the job's choice (seed 001, options
-- `create_contact` and `create_account`): a conversion that makes no
-- contact records `contact_action` 'none', as `account_action` and
-- `deal_action` already do.
ALTER TABLE conversion_results DROP CONSTRAINT conversion_results_contact_action_check;
ALTER TABLE conversion_results ADD CONSTRAINT conversion_results_contact_action_check
    CHECK (contact_action IN ('created', 'merged', 'none'));
