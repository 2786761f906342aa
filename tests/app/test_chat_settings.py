"""A conversation's own sampling settings: the dialog, what the tab's replies use, what is stored.

The real window, worker and tiny model (offscreen). Reply lengths are the observable: with
``stop_on_eos`` off a reply is exactly ``max_new_tokens`` tokens long.
"""

from __future__ import annotations

from typing import Any

from smallmind_app import paths
from smallmind_app.history.store import ConversationStore
from tests.fixtures.window import send, wait_idle

APP_SAMPLING = {"max_new_tokens": 24, "stop_on_eos": False, "seed": 3, "temperature": 0.7}


def choose(window: Any, tab: Any, **values: Any) -> Any:
    """Open the tab's chat settings from its button, give it these values of its own, press OK."""
    tab.settings_button.click()
    dialog = window.chat_settings_dialog
    assert dialog is not None and dialog.objectName() == "chatSettingsDialog"
    for key, value in values.items():
        kind, own, widget = dialog.fields[key]
        own.setChecked(True)
        if kind == "bool":
            widget.setChecked(value)
        else:
            widget.setValue(value)
    assert dialog.ok_button.isEnabled(), dialog.error_label.text()
    dialog.ok_button.click()
    return dialog


def test_a_tabs_own_settings_apply_to_its_replies_only_and_are_kept(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=APP_SAMPLING)
    window = make_window()
    plain, own = window.chat_tabs[0], window.new_chat()
    assert plain.settings_button.text() == "Sampling: app defaults"
    choose(window, own, max_new_tokens=5, temperature=0.0)
    assert own.sampling_overrides == {"max_new_tokens": 5, "temperature": 0.0}
    assert own.settings_button.text() == "Sampling: max tokens 5 · temperature 0"
    assert window.sampling_for(own)["top_p"] == window.settings.sampling["top_p"]  # the rest follow the app

    send(plain, "Tell me a story")
    send(own, "Tell me a story")
    wait_idle(qtbot, plain, own)
    assert plain.entries[-1].stats["n_tokens"] == 24
    assert own.entries[-1].stats["n_tokens"] == 5

    with ConversationStore(paths.database_file()) as store:
        saved = store.get_conversation(own.conversation_id).settings
    assert dict(saved) == {"sampling": {"max_new_tokens": 5, "temperature": 0.0}, "engine": "local"}
    window.close()

    write_settings(sampling={**APP_SAMPLING, "max_new_tokens": 9})  # the app's default changes
    restarted = make_window()
    plain, own = restarted.chat_tabs
    assert own.sampling_overrides == {"max_new_tokens": 5, "temperature": 0.0}
    send(plain, "Again")
    send(own, "Again")
    wait_idle(qtbot, plain, own)
    assert plain.entries[-1].stats["n_tokens"] == 9  # follows the app
    assert own.entries[-1].stats["n_tokens"] == 5  # keeps its own

    dialog = restarted.open_chat_settings(own.conversation_id)
    dialog.restore_button.click()  # "Use app settings for all"
    dialog.ok_button.click()
    assert own.sampling_overrides == {} and own.settings_button.text() == "Sampling: app defaults"
    send(own, "Once more")
    wait_idle(qtbot, own)
    assert own.entries[-1].stats["n_tokens"] == 9


def test_the_dialog_shows_the_app_values_and_blocks_invalid_ones(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=APP_SAMPLING)
    window = make_window()
    tab = window.chat_tabs[0]
    dialog = window.open_chat_settings(tab.conversation_id)
    _, own, field = dialog.fields["temperature"]
    assert not own.isChecked() and not field.isEnabled() and field.value() == 0.7  # follows the app, greyed

    own.setChecked(True)
    field.setValue(1.3)
    _, own_max, max_field = dialog.fields["max_new_tokens"]
    own_max.setChecked(True)
    max_field.setValue(0)
    assert not dialog.ok_button.isEnabled()
    assert "Max new tokens" in dialog.error_label.text() and "max_new_tokens" not in dialog.error_label.text()
    own_max.setChecked(False)  # back to the app's value: valid again
    assert max_field.value() == 24 and dialog.ok_button.isEnabled() and not dialog.error_label.isVisible()
    dialog.ok_button.click()
    assert tab.sampling_overrides == {"temperature": 1.3}

    dialog = window.open_chat_settings(tab.conversation_id)  # opens with what the chat has
    assert dialog.fields["temperature"][1].isChecked() and dialog.fields["temperature"][2].value() == 1.3
    dialog.fields["temperature"][2].setValue(0.2)
    dialog.reject()  # Cancel changes nothing
    assert tab.sampling_overrides == {"temperature": 1.3}

    window.action_chat_settings.trigger()  # the Chat menu's entry opens the current tab's
    assert window.chat_settings_dialog is not None
    assert window.chat_settings_dialog.windowTitle() == f"Chat settings: {tab.title}"
