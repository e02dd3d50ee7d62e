-- Several front-ends, one driver (coordinator/src/relay): requests that a front-end which does
-- not drive the rounds relays to the one that does, and their replies. A row lives from the
-- request until its front-end takes the reply (or gives up waiting).
CREATE TABLE fedlora_relay (
    id bigserial PRIMARY KEY,
    frontend text NOT NULL,
    req_key bigint NOT NULL,
    request bytea NOT NULL,
    reply bytea,
    claimed boolean NOT NULL DEFAULT false,
    created_ms bigint NOT NULL,
    UNIQUE (frontend, req_key)
);
ALTER TABLE fedlora_relay ALTER COLUMN request SET STORAGE EXTERNAL;
ALTER TABLE fedlora_relay ALTER COLUMN reply SET STORAGE EXTERNAL;
-- The front-ends of the federation: who drives, and where each listens (for status and
-- metrics).
CREATE TABLE fedlora_frontends (
    id text PRIMARY KEY,
    listen text NOT NULL,
    started_ms bigint NOT NULL,
    seen_ms bigint NOT NULL,
    driving boolean NOT NULL
);
