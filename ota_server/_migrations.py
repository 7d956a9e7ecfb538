"""The fleet registry's schema: numbered migrations, each applied once, in order, inside a
transaction (``Registry.migrate``). Never edit a released one: add the next number."""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE devices (
                id VARCHAR(128) PRIMARY KEY,
                fleet VARCHAR(128) NOT NULL,
                group_name VARCHAR(128) NOT NULL,
                profile VARCHAR(128) NOT NULL,
                password_hash VARCHAR(256) NOT NULL,
                created_at VARCHAR(40) NOT NULL,
                last_seen VARCHAR(40),
                installed_release VARCHAR(256),
                desired_release VARCHAR(256),
                status VARCHAR(64) NOT NULL DEFAULT 'new',
                telemetry TEXT
            )""",
            "CREATE INDEX devices_by_group ON devices (fleet, group_name)",
        ],
    ),
    (
        2,
        [
            """CREATE TABLE rollouts (
                id VARCHAR(64) PRIMARY KEY,
                release VARCHAR(256) NOT NULL,
                group_name VARCHAR(128) NOT NULL,
                state VARCHAR(32) NOT NULL,
                created_by VARCHAR(128) NOT NULL,
                created_at VARCHAR(40) NOT NULL,
                spec TEXT NOT NULL
            )""",
        ],
    ),
    (
        3,
        [
            "ALTER TABLE rollouts ADD COLUMN wave INTEGER NOT NULL DEFAULT -1",
            "ALTER TABLE rollouts ADD COLUMN bake_until VARCHAR(40)",
            "ALTER TABLE rollouts ADD COLUMN reason TEXT",
            "ALTER TABLE rollouts ADD COLUMN updated_at VARCHAR(40)",
            # the abort rules with their figures, as judged at the end of the last bake
            "ALTER TABLE rollouts ADD COLUMN judgement TEXT",
            """CREATE TABLE rollout_devices (
                rollout_id VARCHAR(64) NOT NULL,
                device_id VARCHAR(128) NOT NULL,
                wave INTEGER,
                state VARCHAR(32) NOT NULL,
                from_release VARCHAR(256),
                assigned_at VARCHAR(40),
                finished_at VARCHAR(40),
                detail TEXT,
                PRIMARY KEY (rollout_id, device_id)
            )""",
            "CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id, state)",
        ],
    ),
    (
        4,
        [
            # recent telemetry windows, so a rollout judges a whole bake, not one window
            """CREATE TABLE telemetry_windows (
                device_id VARCHAR(128) NOT NULL,
                ended_at VARCHAR(40) NOT NULL,
                received_at VARCHAR(40) NOT NULL,
                model VARCHAR(256),
                figures TEXT NOT NULL,
                PRIMARY KEY (device_id, ended_at)
            )""",
            "CREATE INDEX telemetry_windows_by_time ON telemetry_windows (received_at)",
        ],
    ),
    (
        5,
        [
            # the last director document version issued to each device (was a JSON file beside
            # the repository): the next one is taken and committed in one statement
            """CREATE TABLE director_versions (
                fleet VARCHAR(128) NOT NULL,
                device_id VARCHAR(128) NOT NULL,
                version BIGINT NOT NULL,
                PRIMARY KEY (fleet, device_id)
            )""",
        ],
    ),
    (
        6,
        [
            # the audit log (ota_server.audit): ids 1, 2, 3... taken from the head row under its
            # lock (a sequence would skip numbers on rollback, which reads as a deletion)
            """CREATE TABLE audit_log (
                id BIGINT PRIMARY KEY,
                at VARCHAR(40) NOT NULL,
                actor VARCHAR(256) NOT NULL,
                role VARCHAR(32) NOT NULL,
                via VARCHAR(8) NOT NULL,
                action VARCHAR(64) NOT NULL,
                params TEXT NOT NULL,
                outcome VARCHAR(512) NOT NULL,
                prev_hash VARCHAR(64) NOT NULL,
                hash VARCHAR(64) NOT NULL
            )""",
            "CREATE INDEX audit_log_by_action ON audit_log (action, id)",
            # one row: the newest id and its hash, moved in each append's transaction
            """CREATE TABLE audit_head (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                last_id BIGINT NOT NULL,
                last_hash VARCHAR(64) NOT NULL
            )""",
            "INSERT INTO audit_head (id, last_id, last_hash) VALUES (1, 0, '" + "0" * 64 + "')",
        ],
    ),
    (
        7,
        [
            # server replicas sharing this registry (ota_server.cluster): who is alive, by
            # heartbeat (seconds since the epoch, the replicas' clocks), and its broker login
            """CREATE TABLE server_replicas (
                name VARCHAR(128) PRIMARY KEY,
                mqtt_username VARCHAR(128) NOT NULL,
                host VARCHAR(256) NOT NULL,
                pid INTEGER NOT NULL,
                started_at VARCHAR(40) NOT NULL,
                beat_at DOUBLE PRECISION NOT NULL
            )""",
            # leases (the rollout scheduler's): one holder until expires_at; epoch counts holders
            """CREATE TABLE leases (
                name VARCHAR(64) PRIMARY KEY,
                holder VARCHAR(128),
                epoch BIGINT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL
            )""",
            "INSERT INTO leases (name, holder, epoch, expires_at) VALUES ('rollouts', NULL, 0, 0)",
            # the device's clock when its stored state began: an older state taken later by
            # another replica is not written over a newer one
            "ALTER TABLE devices ADD COLUMN state_at VARCHAR(40)",
        ],
    ),
    (
        8,
        [
            # the dashboard's sign-in sessions, so that any replica honours them: keyed by the
            # sha256 of the cookie's id (a reader of the database cannot ride a session)
            """CREATE TABLE dashboard_sessions (
                sid_hash VARCHAR(64) PRIMARY KEY,
                name VARCHAR(256) NOT NULL,
                role INTEGER NOT NULL,
                via VARCHAR(16) NOT NULL,
                csrf VARCHAR(64) NOT NULL,
                created DOUBLE PRECISION NOT NULL,
                expires DOUBLE PRECISION NOT NULL,
                last_used DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX dashboard_sessions_by_created ON dashboard_sessions (created)",
        ],
    ),
    (
        9,
        [
            # a rollout member's shadow run: the totals its device reported (JSON), judged
            # before the wave is sent the release to serve
            "ALTER TABLE rollout_devices ADD COLUMN shadow TEXT",
        ],
    ),
]
