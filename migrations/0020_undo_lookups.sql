-- What an undo looks up per lead: the leads converted into a record (is a
-- record it would delete used by a later conversion? which leads of the
-- same job go first?). Without these, each is a scan of every lead, and a
-- record's delete checks its foreign keys from leads the same way.
CREATE INDEX leads_converted_contact_idx ON leads (converted_contact_id) WHERE converted_contact_id IS NOT NULL;
CREATE INDEX leads_converted_account_idx ON leads (converted_account_id) WHERE converted_account_id IS NOT NULL;
CREATE INDEX leads_converted_deal_idx ON leads (converted_deal_id) WHERE converted_deal_id IS NOT NULL;
