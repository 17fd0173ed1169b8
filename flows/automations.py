"""`python -m flows.automations`: the Prefect automation that tells someone when a scheduled retrain fails.

It fires when a flow run of char-rnn-pipeline/scheduled-retrain enters Failed or Crashed, and sends a
notification through a Prefect notification block: `--notify URL` keeps the URL in a Custom Webhook block
named char-rnn-retrain-failed (a POST of {"text": subject and body}, the shape Slack's and most chat webhooks
take); `--notify TYPE/NAME` uses a notification block of your own (e.g. slack-webhook/team, email, Teams).
Both ways of deploying create it: `python -m flows.serve` and `prefect deploy` (prefect.yaml's build step).
Without --notify, an existing automation keeps its action (the one given before, or set in the UI) and a new
one only records that it fired, in the UI's event feed, until it is given a target.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING
from uuid import UUID

from httpx import HTTPError

import settings
from terminal import Parser

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore

NAME = "char-rnn: scheduled retrain failed"
BLOCK = "char-rnn-retrain-failed"  # the Custom Webhook block that --notify URL writes
FLOW, DEPLOYMENT = "char-rnn-pipeline", "scheduled-retrain"
SUBJECT = "char-rnn: the scheduled retrain {{ flow_run.name }} ended {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }}/{{ deployment.name }} entered "
    "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n{{ flow_run|ui_url }}"
)
BLOCK_NAME = re.compile(r"^[a-z0-9-]+/[A-Za-z0-9_-]+$")


def automation(actions: list) -> AutomationCore:
    """The automation: the retrain deployment's flow runs entering Failed or Crashed, then `actions`."""
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    trigger = EventTrigger(
        expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related=[  # both: another flow may have a deployment of the same name
            {"prefect.resource.role": "flow", "prefect.resource.name": FLOW},
            {"prefect.resource.role": "deployment", "prefect.resource.name": DEPLOYMENT},
        ],
        posture="Reactive",
        threshold=1,
    )
    return AutomationCore(
        name=NAME,
        description=f"Notifies when a run of {FLOW}/{DEPLOYMENT} fails or crashes (flows/automations.py).",
        trigger=trigger,
        actions=actions,
        tags=["char-rnn"],
    )


def notify_target(text: str) -> str:
    """An argparse type for --notify: an http(s) URL, or BLOCK-TYPE/NAME."""
    if not (text.startswith(("http://", "https://")) or BLOCK_NAME.match(text)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an http(s):// URL or BLOCK-TYPE/NAME, e.g. slack-webhook/ops"
        )
    return text


def target(client: SyncPrefectClient, notify: str) -> UUID:
    """The notification block `notify` names: a URL (kept in the Custom Webhook block BLOCK), or TYPE/NAME of
    a notification block on the server. Its id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.exceptions import ObjectNotFound

    if notify.startswith(("http://", "https://")):
        hook = CustomWebhookNotificationBlock(
            name=BLOCK, url=notify, json_data={"text": "{{subject}}\n{{body}}"}
        )
        return hook.save(BLOCK, overwrite=True)
    kind, _, name = notify.partition("/")
    try:
        doc = client.read_block_document_by_name(name=name, block_type_slug=kind)
    except ObjectNotFound:
        doc = None
    if doc is None or "notify" not in (doc.block_schema.capabilities if doc.block_schema else []):
        raise ValueError(
            f"--notify {notify}: no notification block of that type and name on the Prefect server; "
            "create it in the UI (Blocks), or pass a webhook URL"
        )
    return doc.id


def actions(client: SyncPrefectClient, notify: str | None, existing: list) -> list:
    """The notification to `notify`; else the existing automation's actions; else one that only records."""
    from prefect.events.actions import DoNothing, SendNotification

    if notify:
        return [SendNotification(block_document_id=target(client, notify), subject=SUBJECT, body=BODY)]
    if existing:
        return existing[0].actions
    return [DoNothing()]


def ensure(notify: str | None = None) -> UUID:
    """Create the automation, or bring the one of that name up to date; its id. Idempotent."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(NAME)
        wanted = automation(actions(client, notify, existing))
        if not existing:
            return client.create_automation(wanted)
        for extra in existing[1:]:  # two deployers at once may each have made one
            client.delete_automation(extra.id)
        client.update_automation(existing[0].id, wanted)
        return existing[0].id


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m flows.automations", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--notify", type=notify_target, help="a webhook URL, or BLOCK-TYPE/NAME of a notification block"
    )
    args = parser.parse_args(argv)
    url = None
    try:
        os.environ.update(settings.configure())
        # Prefect reads its home and API address when imported: only after configure()
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        if not url:
            raise ValueError(
                "PREFECT_API_URL is not set: the automation lives on the Prefect server it names"
            )
        print(f"Automation {NAME!r} ({ensure(args.notify)}) on {url}")
    except ValueError as e:  # SettingsError included
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except HTTPError as e:
        parser.exit(
            1, f"{parser.prog}: error: the Prefect server at {url} did not answer ({e.__class__.__name__})\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
