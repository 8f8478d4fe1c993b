-- In a cluster a decision is committed before Redis numbers it: its seq is NULL until then
-- (the unique (channel, seq) ignores NULLs), and every node looks for the rows left so by a
-- node that stopped between the commit and the numbering (docs/CLUSTER.md).
ALTER TABLE decisions ALTER COLUMN seq DROP NOT NULL;
CREATE INDEX decisions_unnumbered ON decisions (created_ms) WHERE seq IS NULL;
