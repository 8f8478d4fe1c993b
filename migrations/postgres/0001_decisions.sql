-- Every acknowledged decision, as fanned out. (org, idempotency_key) is the deduplication
-- truth: a key seen before, before or after a restart, is answered with the stored id.
CREATE TABLE decisions (
    id              TEXT             PRIMARY KEY,  -- dec_… as sent to clients
    org             TEXT             NOT NULL,
    channel         TEXT             NOT NULL,
    seq             BIGINT           NOT NULL,     -- the channel's sequence number
    schema          TEXT             NOT NULL,
    idempotency_key TEXT             NOT NULL,
    direction       TEXT             NOT NULL,
    decision        TEXT             NOT NULL,
    tool            TEXT,
    scope           TEXT,
    payload_hash    TEXT             NOT NULL,
    latency_ms      DOUBLE PRECISION,
    correlation_id  TEXT,
    tags            JSONB,                         -- JSON array
    data            JSON             NOT NULL,     -- the data object as sent (JSON keeps its text)
    created_ms      BIGINT           NOT NULL,     -- server time of acceptance, Unix milliseconds
    UNIQUE (org, idempotency_key)
);

-- Replay of a channel from a sequence number.
CREATE UNIQUE INDEX decisions_channel_seq ON decisions (channel, seq);
-- The decisions API: one org's decisions by time, optionally by outcome; retention trims by time.
CREATE INDEX decisions_org_created ON decisions (org, created_ms);
CREATE INDEX decisions_org_decision_created ON decisions (org, decision, created_ms);
CREATE INDEX decisions_created ON decisions (created_ms);
