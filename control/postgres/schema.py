"""The control plane's PostgreSQL schema, as versioned migrations applied in order, once.

Applied by ``meterstream migrate`` and at every start; concurrent starts serialise on an advisory lock, and
each migration commits together with its row in ``meterstream_migrations``, so a crash mid-way leaves the
schema at the previous version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import psycopg

log = logging.getLogger(__name__)

#: Key of the advisory lock that serialises migrations (any fixed number unique to Meterstream).
_MIGRATION_LOCK: Final = 0x6D657465


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "features, subjects, entitlements, grants, usage resets, plans",
        """
        CREATE TABLE features (
            id text PRIMARY KEY,
            key text NOT NULL,
            name text NOT NULL,
            meter_slug text,
            meter_group_by_filters jsonb NOT NULL DEFAULT '{}',
            metadata jsonb,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            archived_at timestamptz
        );
        -- One live feature per key; archived ones keep their key for history.
        CREATE UNIQUE INDEX features_key_live ON features (key) WHERE archived_at IS NULL;

        CREATE TABLE subjects (
            id text PRIMARY KEY,
            key text NOT NULL UNIQUE,
            display_name text,
            metadata jsonb,
            current_period_start timestamptz,
            current_period_end timestamptz,
            stripe_customer_id text,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        );

        CREATE TABLE entitlements (
            id text PRIMARY KEY,
            subject_key text NOT NULL,
            feature_id text NOT NULL REFERENCES features (id),
            feature_key text NOT NULL,
            type text NOT NULL CHECK (type IN ('metered', 'boolean', 'static')),
            usage_period_interval text,
            usage_period_anchor timestamptz,
            usage_period_time_zone text,
            measure_usage_from timestamptz,
            is_soft_limit boolean NOT NULL DEFAULT false,
            is_unlimited boolean NOT NULL DEFAULT false,
            issue_after_reset numeric CHECK (issue_after_reset >= 0),
            issue_after_reset_priority smallint NOT NULL DEFAULT 1,
            preserve_overage_at_reset boolean NOT NULL DEFAULT false,
            config text,
            metadata jsonb,
            -- Made by assigning this plan, from this template (canonical JSON): the plan's to change.
            plan_key text,
            plan_template text,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            deleted_at timestamptz,
            CHECK (type <> 'metered' OR (usage_period_interval IS NOT NULL AND measure_usage_from IS NOT NULL))
        );
        -- One live entitlement per subject and feature.
        CREATE UNIQUE INDEX entitlements_live ON entitlements (subject_key, feature_key) WHERE deleted_at IS NULL;
        CREATE INDEX entitlements_feature ON entitlements (feature_id);
        CREATE INDEX entitlements_subject ON entitlements (subject_key, created_at);

        CREATE TABLE grants (
            id text PRIMARY KEY,
            entitlement_id text NOT NULL REFERENCES entitlements (id),
            amount numeric NOT NULL CHECK (amount >= 0),
            priority smallint NOT NULL CHECK (priority BETWEEN 1 AND 255),
            effective_at timestamptz NOT NULL,
            expiration_duration text NOT NULL,
            expiration_count integer NOT NULL,
            expires_at timestamptz NOT NULL,
            max_rollover_amount numeric NOT NULL,
            min_rollover_amount numeric NOT NULL,
            recurrence_interval text,
            recurrence_anchor timestamptz,
            recurrence_time_zone text,
            metadata jsonb,
            annotations jsonb,
            voided_at timestamptz,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        );
        CREATE INDEX grants_entitlement ON grants (entitlement_id);

        CREATE TABLE usage_resets (
            entitlement_id text NOT NULL REFERENCES entitlements (id),
            reset_at timestamptz NOT NULL,
            retain_anchor boolean NOT NULL,
            preserve_overage boolean NOT NULL,
            created_at timestamptz NOT NULL,
            PRIMARY KEY (entitlement_id, reset_at)
        );

        CREATE TABLE plans (
            id text PRIMARY KEY,
            key text NOT NULL,
            name text NOT NULL,
            description text,
            version integer NOT NULL,
            entitlements jsonb NOT NULL,
            metadata jsonb,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            deleted_at timestamptz
        );
        CREATE UNIQUE INDEX plans_key_live ON plans (key) WHERE deleted_at IS NULL;

        CREATE TABLE subject_plans (
            subject_key text PRIMARY KEY,
            plan_key text NOT NULL,
            plan_version integer NOT NULL,
            is_default boolean NOT NULL,
            assigned_at timestamptz NOT NULL
        );
        """,
    ),
    Migration(
        2,
        "API keys and portal tokens",
        """
        -- Only a SHA-256 of each secret is kept; the public id finds the record.
        CREATE TABLE api_keys (
            id text PRIMARY KEY,
            name text NOT NULL,
            scopes text[] NOT NULL,
            secret_sha256 bytea NOT NULL,
            created_at timestamptz NOT NULL,
            revoked_at timestamptz
        );

        CREATE TABLE portal_tokens (
            id text PRIMARY KEY,
            subject_key text NOT NULL,
            allowed_meter_slugs text[],
            secret_sha256 bytea NOT NULL,
            created_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            invalidated_at timestamptz
        );
        CREATE INDEX portal_tokens_subject ON portal_tokens (subject_key);
        """,
    ),
    Migration(
        3,
        "reservations: holds before a call, settled by a commit or a release",
        """
        CREATE TABLE reservations (
            id text PRIMARY KEY,
            subject_key text NOT NULL,
            status text NOT NULL,
            provider text,
            model text,
            request_digest text NOT NULL,
            estimate jsonb,
            created_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            committed_at timestamptz,
            released_at timestamptz,
            event jsonb,
            usage_digest text,
            sent_at timestamptz,
            event_topic text,
            event_partition integer,
            event_offset bigint
        );
        -- What a reserve must count: live holds, and recent commits (whose usage may not be in the windows yet).
        CREATE INDEX reservations_held ON reservations (subject_key, expires_at) WHERE status = 'held';
        CREATE INDEX reservations_committed ON reservations (subject_key, committed_at) WHERE status = 'committed';
        -- Commits whose event the broker has not acknowledged yet (the relay sends them).
        CREATE INDEX reservations_unsent ON reservations (committed_at)
            WHERE status = 'committed' AND sent_at IS NULL;

        CREATE TABLE reservation_lines (
            reservation_id text NOT NULL REFERENCES reservations (id),
            entitlement_id text NOT NULL,
            feature_key text NOT NULL,
            amount numeric NOT NULL,
            is_soft_limit boolean NOT NULL,
            actual numeric,
            PRIMARY KEY (reservation_id, entitlement_id)
        );
        """,
    ),
    Migration(
        4,
        "notification channels, rules, crossings, events and their webhook deliveries (an outbox)",
        """
        CREATE TABLE notification_channels (
            id text PRIMARY KEY,
            name text NOT NULL,
            url text NOT NULL,
            custom_headers jsonb NOT NULL DEFAULT '{}',
            signing_secret text NOT NULL,
            disabled boolean NOT NULL DEFAULT false,
            metadata jsonb,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            deleted_at timestamptz
        );

        CREATE TABLE notification_rules (
            id text PRIMARY KEY,
            type text NOT NULL,
            name text NOT NULL,
            disabled boolean NOT NULL DEFAULT false,
            thresholds jsonb NOT NULL DEFAULT '[]',
            feature_ids text[] NOT NULL DEFAULT '{}',
            channel_ids text[] NOT NULL,
            metadata jsonb,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            deleted_at timestamptz
        );

        -- One row per (rule, subject, feature, period, threshold) ever crossed: the primary key is what makes
        -- every threshold fire once per period, whatever evaluates it concurrently.
        CREATE TABLE alert_crossings (
            rule_id text NOT NULL,
            subject_key text NOT NULL,
            feature_id text NOT NULL,
            period_start timestamptz NOT NULL,
            threshold text NOT NULL,
            crossed boolean NOT NULL,
            usage_at_cross numeric NOT NULL,
            event_id text NOT NULL,
            times_crossed integer NOT NULL DEFAULT 1,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (rule_id, subject_key, feature_id, period_start, threshold)
        );

        CREATE TABLE notification_events (
            id text PRIMARY KEY,
            type text NOT NULL,
            rule_id text NOT NULL REFERENCES notification_rules (id),
            subject_key text,
            feature_id text,
            feature_key text,
            -- The webhook body exactly as sent and signed (text, not jsonb: its decimals stay exact).
            payload text NOT NULL,
            annotations jsonb,
            created_at timestamptz NOT NULL
        );
        CREATE INDEX notification_events_created ON notification_events (created_at);
        CREATE INDEX notification_events_rule ON notification_events (rule_id);
        CREATE INDEX notification_events_subject ON notification_events (subject_key);

        -- The outbox: one row per (event, channel), written with the event in one transaction; a sender
        -- leases due rows, posts outside any transaction, and records the outcome only under its lease.
        CREATE TABLE notification_deliveries (
            event_id text NOT NULL REFERENCES notification_events (id),
            channel_id text NOT NULL,
            state text NOT NULL,
            reason text NOT NULL DEFAULT '',
            next_attempt_at timestamptz,
            give_up_at timestamptz NOT NULL,
            lease_token text,
            attempts integer NOT NULL DEFAULT 0,
            delivered_at timestamptz,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (event_id, channel_id)
        );
        CREATE INDEX notification_deliveries_due ON notification_deliveries (next_attempt_at)
            WHERE state IN ('PENDING', 'SENDING', 'RESENDING');

        CREATE TABLE notification_attempts (
            event_id text NOT NULL,
            channel_id text NOT NULL,
            n integer NOT NULL,
            at timestamptz NOT NULL,
            state text NOT NULL,
            status_code integer,
            body text NOT NULL DEFAULT '',
            duration_ms integer NOT NULL,
            url text,
            PRIMARY KEY (event_id, channel_id, n)
        );

        -- Resets already notified (a reset rule fires once per reset).
        CREATE TABLE reset_notices (
            rule_id text NOT NULL,
            entitlement_id text NOT NULL,
            reset_at timestamptz NOT NULL,
            PRIMARY KEY (rule_id, entitlement_id, reset_at)
        );

        -- Which process sweeps next (one at a time, every sweep interval).
        CREATE TABLE alert_sweeps (name text PRIMARY KEY, next_at timestamptz NOT NULL);
        """,
    ),
    Migration(
        5,
        "meters users define through the API",
        """
        CREATE TABLE meters (
            id text PRIMARY KEY,
            slug text NOT NULL,
            name text NOT NULL,
            description text,
            event_type text NOT NULL,
            aggregation text NOT NULL,
            value_property text,
            group_by jsonb NOT NULL DEFAULT '{}',
            event_from timestamptz,
            metadata jsonb,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            deleted_at timestamptz
        );
        -- One live meter per slug; a deleted one keeps its row (and its slug may be used again).
        CREATE UNIQUE INDEX meters_live_slug ON meters (slug) WHERE deleted_at IS NULL;
        """,
    ),
)


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply the migrations not applied yet; returns the versions applied now."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS meterstream_migrations ("
            "version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM meterstream_migrations").fetchall()}
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO meterstream_migrations (version, description) VALUES (%s, %s)",
                    (migration.version, migration.description),
                )
            log.info("postgres: applied migration %d (%s)", migration.version, migration.description)
            applied.append(migration.version)
    return applied
