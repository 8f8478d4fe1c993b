-- Revoked tokens (POST /api/tokens/revoke), kept until no token they cover can still be valid:
-- every shard refuses them at connect, after a restart too.
CREATE TABLE revocations (
    kind     TEXT    NOT NULL,             -- 'jti' or 'sub'
    value    TEXT    NOT NULL,             -- the token's jti, or the user's sub
    org      TEXT    NOT NULL DEFAULT '',  -- a sub's org ('': every org)
    at_ms    INTEGER NOT NULL,             -- a sub's tokens issued at or before it are revoked
    until_ms INTEGER NOT NULL,             -- kept until then (Unix milliseconds)
    PRIMARY KEY (kind, value, org)
);
