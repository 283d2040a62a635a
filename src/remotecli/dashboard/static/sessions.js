// "My sessions": running sessions first (the viewed one among them, whatever its state), then
// the ended ones in a group of their own with the reason each ended (folded when there are
// many); a session's name edited in place; and a notice, once per browser, of the sessions a
// restart of remote-cli ended. The page (app.js) makes the API calls and hands the answers in.
// A label is the user's text: it reaches the page through textContent and value only.

import { ApiError, FINAL_STATES } from "./api.js";
import { button, element } from "./elements.js";

/** The longest label the API takes (LABEL_MAX in controller/sessions.py). */
export const LABEL_MAX = 64;

/** What a hibernated session says: saved to disk with no viewer, opening it wakes it. */
export const ASLEEP_TEXT = "Asleep — opens in about a second";
// Sessions the user removed from the list, and those a restart ended that this browser was
// already told about; each list keeps the newest REMEMBERED_IDS ids.
const HIDDEN_KEY = "remotecli.hiddenSessions";
const NOTIFIED_KEY = "remotecli.restartNotified";
const REMEMBERED_IDS = 500;
// With more ended sessions than this, their group starts folded.
const ENDED_OPEN_AT_MOST = 5;

const $ = (id) => document.getElementById(id);

/** Read JSON kept in localStorage, or `fallback` when it is missing or unreadable. */
export function stored(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key) ?? "null") ?? fallback;
  } catch {
    return fallback;
  }
}

/**
 * Keep a set of session ids in localStorage, the newest REMEMBERED_IDS of them. Not pruned to the
 * sessions listed now: another user may sign in in this browser, and must not undo these.
 */
function rememberIds(key, ids) {
  localStorage.setItem(key, JSON.stringify([...ids].slice(-REMEMBERED_IDS)));
}

/** The session as the page names it: its label, else its provider and the start of its id. */
export function sessionLabel(session) {
  return session.label || `${session.provider} ${session.id.slice(0, 8)}`;
}

/** How long ago `createdAt` (ISO 8601) was, in words ("" when unknown). */
function age(createdAt) {
  const created = Date.parse(createdAt ?? "");
  if (Number.isNaN(created)) return "";
  const seconds = Math.max(0, Math.round((Date.now() - created) / 1000));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function factsText(session) {
  const provider = session.label ? `${session.provider} · ` : "";
  return `${provider}${session.id} · ${age(session.created_at)} old`;
}

/**
 * The list in #sessions and the notice in #notice. `actions` are the page's: viewing() → the id
 * of the viewed session or null; reconnect(session); terminate(session, confirmed);
 * rename(id, label) → the renamed session, or throws ApiError; renamed(session);
 * unauthorised().
 */
export class SessionList {
  constructor(actions) {
    this.actions = actions;
    this.sessions = [];
    this.hidden = new Set(stored(HIDDEN_KEY, []));
    // The question before ending a viewed session: its id, or null.
    this.confirming = null;
    // The session whose name is being edited: {id, draft, error, saving}, or null.
    this.renaming = null;
    // Whether the Ended group is open: null until the user folds or opens it.
    this.endedOpen = null;
    // The ids the restart notice shows now, until dismissed.
    this.notice = [];
    // A click on the summary (or Enter or Space on it) is the user's choice, kept from then on.
    $("sessions-ended-title").addEventListener("click", () => {
      this.endedOpen = !$("sessions-ended-group").open;
    });
    $("notice-dismiss").addEventListener("click", () => this.dismissNotice());
  }

  find(id) {
    return this.sessions.find((item) => item.id === id);
  }

  /** Show the list GET /api/sessions answered; tell of sessions a restart ended, once. */
  show(sessions) {
    this.sessions = sessions;
    this.render();
    this.noticeRestarts();
  }

  /** Show a session the API answered (new or renamed), first if it is new. */
  put(session) {
    if (this.find(session.id)) {
      this.sessions = this.sessions.map((item) => (item.id === session.id ? session : item));
    } else {
      this.sessions = [session, ...this.sessions];
    }
    this.render();
  }

  /** A state (and reason) from the session's event stream. */
  update(id, { state, reason }) {
    const session = this.find(id);
    if (session && state) {
      session.state = state;
      if (reason) session.reason = reason;
      this.render();
    }
  }

  /** Forget everything shown (signed out). */
  clear() {
    this.sessions = [];
    this.confirming = null;
    this.renaming = null;
    this.notice = [];
    this.render();
    this.renderNotice();
  }

  /** Show (or, with null, hide) the question before ending a session someone is viewing. */
  ask(sessionId) {
    this.confirming = sessionId;
    this.render();
    if (sessionId) {
      document.querySelector(`li[data-session-id="${sessionId}"] .confirm + button`)?.focus();
    }
  }

  /** Take a session the user ended or removed off the list, for good in this browser. */
  remove(sessionId) {
    this.confirming = null;
    if (this.renaming?.id === sessionId) this.renaming = null;
    this.hidden.add(sessionId);
    rememberIds(HIDDEN_KEY, this.hidden);
    this.render();
    if (this.notice.includes(sessionId)) {
      this.notice = this.notice.filter((id) => id !== sessionId);
      this.renderNotice();
    }
  }

  // --- the list --------------------------------------------------------------------------------

  /** Draw the list; rebuilt only when more than the ages changed (keeps keyboard focus). */
  render() {
    const container = $("sessions");
    const viewing = this.actions.viewing();
    const sessions = this.sessions.filter((session) => !this.hidden.has(session.id));
    const ended = sessions.filter(
      (session) => FINAL_STATES.has(session.state) && session.id !== viewing,
    );
    const active = sessions.filter((session) => !ended.includes(session));
    const shape = JSON.stringify([
      sessions.map((session) => [
        session.id,
        session.state,
        session.reason,
        session.label,
        session.end_cause,
      ]),
      viewing,
      this.confirming,
      this.renaming?.id ?? null,
      this.renaming?.error ?? null,
    ]);
    if (shape === container.dataset.shape) {
      for (const session of sessions) {
        const facts = container.querySelector(`li[data-session-id="${session.id}"] .facts`);
        if (facts) facts.textContent = factsText(session);
      }
      return;
    }
    container.dataset.shape = shape;
    const editing = document.activeElement?.classList.contains("rename-input") ?? false;
    $("sessions-active").replaceChildren(...active.map((session) => this.item(session, viewing)));
    $("sessions-ended").replaceChildren(...ended.map((session) => this.item(session, viewing)));
    const group = $("sessions-ended-group");
    group.hidden = ended.length === 0;
    group.open = this.endedOpen ?? ended.length <= ENDED_OPEN_AT_MOST;
    $("sessions-ended-title").textContent = `Ended (${ended.length})`;
    const empty = $("sessions-empty");
    empty.textContent = sessions.length ? "No running sessions." : "No sessions yet.";
    empty.hidden = active.length > 0;
    if (editing) this.focusRename();
  }

  /** One session: its name, state, facts, why it ended, and what can be done with it. */
  item(session, viewing) {
    const final = FINAL_STATES.has(session.state);
    const item = element("li", undefined, "session");
    item.dataset.sessionId = session.id;
    item.dataset.state = session.state;
    if (session.end_cause) item.dataset.endCause = session.end_cause;
    if (session.id === viewing) item.classList.add("current");
    const title = element("div", undefined, "session-title");
    title.append(element("strong", sessionLabel(session), "session-name"));
    if (this.renaming?.id !== session.id) {
      const rename = button("Rename", () => this.startRename(session), {
        className: "rename-button",
      });
      rename.title = "Give this session a name of your own";
      title.append(rename);
    }
    const asleep = session.state === "hibernated";
    const badgeText = asleep ? "asleep" : session.state;
    const badge = element("span", badgeText, `badge state-${session.state}`);
    if (asleep) badge.title = ASLEEP_TEXT;
    title.append(badge);
    item.append(title);
    if (this.renaming?.id === session.id) item.append(this.editor(session));
    item.append(element("div", factsText(session), "muted facts"));
    if (asleep) item.append(element("div", ASLEEP_TEXT, "hint asleep"));
    if (session.reason && final) item.append(element("div", session.reason, "hint reason"));
    const actions = element("div", undefined, "actions");
    if (this.confirming === session.id && !final) {
      const question = element("p", "End this session? It is open in a viewer.", "confirm");
      question.id = `confirm-${session.id}`;
      const end = button("End session", () => this.actions.terminate(session, true), {
        className: "danger",
      });
      end.setAttribute("aria-describedby", question.id);
      actions.classList.add("confirming");
      actions.append(question, end, button("Keep it", () => this.ask(null)));
    } else {
      if (!final) {
        const openable = session.state === "ready" || asleep; // opening wakes a sleeper
        const verb = asleep ? "Open" : "Reconnect";
        actions.append(
          button(verb, () => this.actions.reconnect(session), { disabled: !openable }),
        );
      }
      const verb = final ? "Remove" : "Terminate";
      actions.append(button(verb, () => this.actions.terminate(session), { className: "danger" }));
    }
    item.append(actions);
    return item;
  }

  // --- renaming --------------------------------------------------------------------------------

  startRename(session) {
    this.renaming = { id: session.id, draft: session.label ?? "", error: null, saving: false };
    this.confirming = null;
    this.render();
    this.focusRename(true);
  }

  cancelRename() {
    const id = this.renaming?.id;
    this.renaming = null;
    this.render();
    if (id) this.focusRenameButton(id);
  }

  focusRename(select = false) {
    const input = $("sessions").querySelector(".rename-input");
    if (!input) return;
    input.focus();
    if (select) input.select();
    else input.setSelectionRange(input.value.length, input.value.length);
  }

  focusRenameButton(sessionId) {
    document.querySelector(`li[data-session-id="${sessionId}"] .rename-button`)?.focus();
  }

  /** The name editor: Enter (or Save) saves, Escape (or Cancel) cancels; empty removes it. */
  editor(session) {
    const renaming = this.renaming;
    const form = element("form", undefined, "rename");
    form.noValidate = true;
    const input = element("input", undefined, "rename-input");
    input.type = "text";
    input.maxLength = LABEL_MAX;
    input.autocomplete = "off";
    input.spellcheck = false;
    input.value = renaming.draft;
    input.placeholder = `${session.provider} ${session.id.slice(0, 8)}`;
    input.setAttribute("aria-label", `New name for ${sessionLabel(session)} (empty removes it)`);
    input.addEventListener("input", () => {
      renaming.draft = input.value;
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        this.cancelRename();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.saveRename(session.id);
    });
    const save = element("button", "Save");
    save.type = "submit";
    form.append(input, save, button("Cancel", () => this.cancelRename()));
    if (renaming.error) {
      const refusal = element("p", renaming.error, "rename-error");
      refusal.id = `rename-error-${session.id}`;
      refusal.setAttribute("role", "alert");
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", refusal.id);
      form.append(refusal);
    }
    return form;
  }

  /** Save the new name; show the server's words when it refuses one (422). */
  async saveRename(sessionId) {
    const renaming = this.renaming;
    if (!renaming || renaming.id !== sessionId || renaming.saving) return;
    renaming.saving = true;
    let session;
    try {
      session = await this.actions.rename(sessionId, renaming.draft.trim() || null);
    } catch (error) {
      renaming.saving = false;
      if (error instanceof ApiError && error.status === 401) {
        this.actions.unauthorised();
        return;
      }
      if (this.renaming !== renaming) return;
      renaming.error = error.message;
      this.render();
      this.focusRename();
      return;
    }
    if (this.renaming === renaming) this.renaming = null;
    this.put(session);
    this.focusRenameButton(sessionId);
    this.renderNotice();
    this.actions.renamed(session);
  }

  // --- the notice of sessions a restart ended ------------------------------------------------

  /** Add the sessions a restart ended that this browser was not told about to the notice. */
  noticeRestarts() {
    const told = new Set(stored(NOTIFIED_KEY, []));
    const fresh = this.sessions.filter(
      (session) =>
        session.end_cause === "restart" && !told.has(session.id) && !this.hidden.has(session.id),
    );
    if (!fresh.length) return;
    for (const session of fresh) {
      told.add(session.id);
      if (!this.notice.includes(session.id)) this.notice.push(session.id);
    }
    rememberIds(NOTIFIED_KEY, told);
    this.renderNotice();
  }

  renderNotice() {
    const shown = this.notice.map((id) => this.find(id)).filter((session) => session);
    $("notice-text").textContent =
      `${shown.length === 1 ? "1 session" : `${shown.length} sessions`} ended because ` +
      "remote-cli was restarted; start new ones from Connect provider:";
    $("notice-sessions").replaceChildren(
      ...shown.map((session) => {
        const item = element("li", sessionLabel(session));
        item.dataset.sessionId = session.id;
        if (session.label) {
          const which = ` (${session.provider} ${session.id.slice(0, 8)})`;
          item.append(element("span", which, "muted"));
        }
        return item;
      }),
    );
    $("notice").hidden = shown.length === 0;
  }

  dismissNotice() {
    this.notice = [];
    this.renderNotice();
  }
}
