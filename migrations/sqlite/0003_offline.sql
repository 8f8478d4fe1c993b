-- Messages the server API sent to users who were not connected ([offline]), kept until they
-- connect (then delivered, oldest first, and deleted) or expire. Each is one numbered
-- publication of the user's channel.
CREATE TABLE offline_messages (
    id         TEXT    PRIMARY KEY,          -- {boot}-{shard}-{n}, made by the user's owner shard
    ord        INTEGER NOT NULL,             -- n: the order within one millisecond
    user_id    TEXT    NOT NULL,
    org        TEXT    NOT NULL DEFAULT '',  -- only the user's connections of this org ('': any)
    channel    TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    data       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX offline_messages_user ON offline_messages (user_id);
CREATE INDEX offline_messages_expires ON offline_messages (expires_ms);
