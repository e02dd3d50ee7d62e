-- fedlora coordinator state, schema version 1 (see coordinator/src/store/postgres.rs).
-- Records are JSON text (the same encoding as the sled store's); the federation state is
-- bincode bytes. Payloads and checkpoints are stored uncompressed (EXTERNAL): they are
-- codec bytes that do not compress, and TOAST would spend CPU trying.
CREATE TABLE fedlora_meta (key text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE fedlora_uploads (
    round bigint NOT NULL,
    client text NOT NULL,
    digest bytea NOT NULL,
    record text NOT NULL,
    PRIMARY KEY (round, client)
);
CREATE TABLE fedlora_payloads (
    round bigint NOT NULL,
    digest bytea NOT NULL,
    bytes bytea NOT NULL,
    PRIMARY KEY (round, digest)
);
ALTER TABLE fedlora_payloads ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE TABLE fedlora_checkpoints (
    version bigint PRIMARY KEY,
    record text NOT NULL,
    bytes bytea NOT NULL
);
ALTER TABLE fedlora_checkpoints ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE TABLE fedlora_optimizer (version bigint PRIMARY KEY, bytes bytea NOT NULL);
CREATE TABLE fedlora_rounds (round bigint PRIMARY KEY, record text NOT NULL);
CREATE TABLE fedlora_evals (
    version bigint NOT NULL,
    client text NOT NULL,
    record text NOT NULL,
    PRIMARY KEY (version, client)
);
CREATE TABLE fedlora_clients (client text PRIMARY KEY, record text NOT NULL);
CREATE TABLE fedlora_devices (device_id text PRIMARY KEY, record text NOT NULL);
CREATE TABLE fedlora_tokens_used (hash text PRIMARY KEY, device_id text NOT NULL);
