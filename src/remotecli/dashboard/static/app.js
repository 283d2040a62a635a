// The dashboard page: who is signed in (and Sign out), the provider cards (connected or not),
// "My sessions" (named by their labels, ended ones kept with their reason, a notice once for
// those a restart ended), the progress of a new session from its event stream, the provider
// sign-in a session asks for, and the live view, as text (terminal.js) or as the desktop
// (viewer.js); beside it, in a tab of its own, Ask: headless runs (runs.js); for the admin, the
// cluster's hosts (hosts.js). Plain ES modules,
// no build step. Labels are the user's text: they reach the page
// only through textContent, value and document.title, never as markup.

import { api, ApiError, endedMessage, FINAL_STATES, followEvents, webLink } from "./api.js";
import { button, element } from "./elements.js";
import { HostsPanel } from "./hosts.js";
import { askable, AskPanel } from "./runs.js";
import { ASLEEP_TEXT, SessionList, sessionLabel, stored } from "./sessions.js";
import { FONT_SIZES, TextView } from "./terminal.js";
import { Viewer } from "./viewer.js";

const NOVNC_URL = "/dashboard/remote-cli/novnc/rfb.js";
const REFRESH_MS = 5000;
const COPIED_MS = 2000;
// The user who sees the admin's view (the hosts): remotecli's ADMIN_USER.
const ADMIN = "admin";
// The view chosen for each session ("text" or "desktop"), the text view's font size, and the view
// new sessions open in (unset: text, as for every terminal provider).
const VIEWS_KEY = "remotecli.views";
const FONT_KEY = "remotecli.fontSize";
const DEFAULT_VIEW_KEY = "remotecli.defaultView";
const VIEWS = ["text", "desktop"];
// The pane shown beside the sidebar in this tab of the browser: "live" (the view) or "ask".
const PANE_KEY = "remotecli.pane";
const PANES = ["live", "ask"];

const $ = (id) => document.getElementById(id);

const page = {
  providers: [],
  providersShape: "",
  starting: false,
  viewing: null,
  // The sign-in the viewed session asked for: its session and the link it asked to open.
  signin: { sessionId: null, url: null },
  // Links the user hid, by session: not shown again until the session asks for another one.
  hiddenLinks: new Map(),
  stopEvents: null,
  refreshTimer: null,
  // The session being viewed: its status-line name, and the view it is shown in.
  label: "",
  view: null,
  // The session named by the address (#session=ID), opened once the list has loaded.
  wanted: sessionInAddress(),
  // The ended message the status line shows for the viewed session (said again on a rename).
  endedText: null,
  // Counts sign-outs: an answer to a request sent before the last one is dropped.
  signOuts: 0,
  // The pane shown: the live view, or Ask.
  pane: "live",
};

/** The session id the address names (`#session=ID`), or null. */
function sessionInAddress() {
  const id = new URLSearchParams(location.hash.slice(1)).get("session");
  return id && /^[A-Za-z0-9_-]{1,64}$/.test(id) ? id : null;
}

/** Name the viewed session in the address, so a reload (or a bookmark) opens it again. */
function setAddress(sessionId) {
  const hash = sessionId ? `#session=${encodeURIComponent(sessionId)}` : "";
  if (location.hash !== hash) {
    history.replaceState(null, "", `${location.pathname}${location.search}${hash}`);
  }
}

/** The viewed session above the view: its label (if any), provider and whole id. */
function viewerCaption(session) {
  const caption = `${session.provider} · ${session.id}`;
  return session.label ? `${session.label} · ${caption}` : caption;
}

/** Name the viewed session in the window's title (a tab among others). */
function setTitle(name) {
  document.title = name ? `${name} · remote-cli` : "remote-cli";
}

/** The view `sessionId` was last shown in, else the default (text). */
function chosenView(sessionId) {
  const chosen = stored(VIEWS_KEY, {})[sessionId];
  if (VIEWS.includes(chosen)) return chosen;
  const preferred = localStorage.getItem(DEFAULT_VIEW_KEY);
  return VIEWS.includes(preferred) ? preferred : "text";
}

function rememberView(sessionId, view) {
  const known = new Set(list.sessions.map((item) => item.id));
  const views = Object.fromEntries(
    Object.entries(stored(VIEWS_KEY, {})).filter(([id]) => known.has(id)),
  );
  views[sessionId] = view;
  localStorage.setItem(VIEWS_KEY, JSON.stringify(views));
}

let rfbModule = null;

/** Import noVNC once; on failure explain how to install it (the server's 503 says how). */
async function loadRfb() {
  if (rfbModule) return rfbModule;
  try {
    rfbModule = (await import(NOVNC_URL)).default;
    return rfbModule;
  } catch (error) {
    let message = `The noVNC viewer could not be loaded (${error.message}): run \`make up\`.`;
    try {
      const response = await fetch(NOVNC_URL, { method: "GET" });
      if (!response.ok) message = (await response.text()).trim();
    } catch {
      // keep the generic message: the server itself is unreachable
    }
    showBanner(message);
    throw new Error(message);
  }
}

const viewer = new Viewer($("screen"), loadRfb);
const textView = new TextView($("terminal"), { fontSize: stored(FONT_KEY, undefined) });

/** The view showing the session now (the other one is disconnected). */
function activeView() {
  return page.view === "desktop" ? viewer : textView;
}

function disconnectViews() {
  viewer.disconnect();
  textView.disconnect();
}

function setStatus(tone, text) {
  const status = $("status");
  status.dataset.tone = tone;
  status.textContent = text;
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function elapsed(since) {
  return `${((performance.now() - since) / 1000).toFixed(2)} s`;
}

// --- sign-in and periodic refresh ------------------------------------------------------------

async function refresh() {
  const signOuts = page.signOuts;
  let sessions;
  try {
    sessions = await api("GET", "/api/sessions");
    if (signOuts !== page.signOuts) return; // sent with the login that just ended
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      showLogin();
      return;
    }
    showBanner(error.message);
    return;
  }
  if ($("main").hidden) await showMain();
  else await loadProviders();
  showBanner("");
  list.show(sessions);
  if (page.pane === "ask") ask.refresh();
  if (page.wanted) openFromAddress();
  // The event stream tells the link at once; the list catches one missed while it reconnected.
  const current = sessions.find((item) => item.id === page.viewing);
  if (current?.open_url && !FINAL_STATES.has(current.state)) {
    showSignIn(current.id, current.open_url);
  }
}

/** Show the token form instead of the dashboard (no login, or it ended). */
function showLogin(text = "Sign in to start a session.") {
  const already = !$("login").hidden;
  if (page.stopEvents) page.stopEvents();
  page.stopEvents = null;
  disconnectViews();
  $("main").hidden = true;
  $("login").hidden = false;
  $("account-name").textContent = "Not signed in";
  $("signout").hidden = true;
  setStatus("idle", text);
  // Only on the way in: the periodic refresh must not pull the focus back every few seconds.
  if (!already) $("login-token").focus();
}

async function showMain() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("account-name").textContent = "Signed in";
  $("signout").hidden = false;
  loadAccount();
  if ($("status").dataset.tone === "idle") setStatus("idle", "Not connected to a session.");
  loadRfb().catch(() => {
    // the banner already says how to install noVNC; connecting will say it again
  });
  await loadProviders();
  renderProviders();
}

/** Say who is signed in (GET /api/me) beside Sign out. */
async function loadAccount() {
  let me;
  try {
    me = await api("GET", "/api/me");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) showLogin();
    return; // the banner says why the server is not answering; "Signed in" stays
  }
  if (!$("main").hidden) $("account-name").textContent = `Signed in as ${me.name}`;
  if (me.name === ADMIN) hosts.start();
}

/**
 * Sign out: the server ends this browser's login and clears the cookie, so a reload (or a copy
 * of the cookie) is signed out too. Then the page forgets what it showed and asks for the token.
 */
async function signOut() {
  const signout = $("signout");
  signout.disabled = true;
  try {
    await api("POST", "/api/logout");
  } catch (error) {
    setStatus("error", `Could not sign out: ${error.message}`);
    return;
  } finally {
    signout.disabled = false;
  }
  page.signOuts += 1;
  leaveSession();
  page.hiddenLinks.clear();
  list.clear();
  ask.clear();
  hosts.stop();
  $("progress").hidden = true;
  showLogin("Signed out. Sign in again with your token to start a session.");
}

// --- providers ---------------------------------------------------------------------------------

/** Fetch the providers; redraw the cards only when something changed (keeps keyboard focus). */
async function loadProviders() {
  let providers;
  try {
    providers = await api("GET", "/api/providers");
  } catch (error) {
    showBanner(error.message);
    return;
  }
  const shape = JSON.stringify(providers);
  if (shape === page.providersShape) return;
  page.providersShape = shape;
  page.providers = providers;
  renderProviders();
}

/** A date and time from the API (ISO 8601) in the reader's own words, or "" when there is none. */
function when(iso) {
  const date = new Date(iso ?? "");
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** "Connected since …", and when the kept sign-in last changed if that was later. */
function connectedNote(provider) {
  const note = element("p", undefined, "connected");
  note.id = `connected-${provider.name}`;
  note.append(element("strong", "Connected"));
  const since = provider.connected_at ?? provider.updated_at;
  if (since) {
    const time = element("time", ` since ${when(since)}`);
    time.dateTime = since;
    note.append(time);
  }
  const changed = Date.parse(provider.updated_at ?? "") - Date.parse(since ?? "");
  if (changed >= 60_000) {
    const time = element("time", ` · renewed ${when(provider.updated_at)}`);
    time.dateTime = provider.updated_at;
    note.append(time);
  }
  note.title = "Your sign-in is kept: new sessions of this provider start signed in.";
  return note;
}

function renderProviders() {
  const list = $("providers");
  list.replaceChildren();
  for (const provider of page.providers) {
    const item = element("li", undefined, "card");
    item.dataset.provider = provider.name;
    item.dataset.connected = String(provider.connected === true);
    const connect = button(provider.title, () => startSession(provider), {
      disabled: !provider.available || page.starting,
      className: "card-button",
    });
    connect.dataset.provider = provider.name;
    item.append(connect);
    const described = [];
    if (provider.connected) {
      const note = connectedNote(provider);
      const forget = button("Disconnect", () => disconnectProvider(provider), {
        className: "link-button danger",
      });
      forget.setAttribute("aria-label", `Disconnect ${provider.title}`);
      forget.dataset.disconnect = provider.name;
      described.push(note.id);
      item.append(note, forget);
    }
    if (provider.available && provider.preparing) {
      const note = element("p", `Getting ready: ${provider.preparing}`, "hint");
      note.id = `preparing-${provider.name}`;
      described.push(note.id);
      item.append(note);
    }
    if (!provider.available && provider.hint) {
      const hint = element("p", provider.hint, "hint");
      hint.id = `hint-${provider.name}`;
      described.push(hint.id);
      item.append(hint);
    } else if (!provider.available) {
      item.append(element("p", "Not available.", "muted"));
    }
    if (askable(provider)) {
      const askIt = button("Ask", () => showAsk(provider.name), { className: "link-button" });
      askIt.setAttribute("aria-label", `Ask ${provider.title} (a headless run)`);
      askIt.title = "Run one prompt headless, without a session to watch";
      askIt.dataset.ask = provider.name;
      item.append(askIt);
    }
    if (described.length) connect.setAttribute("aria-describedby", described.join(" "));
    list.append(item);
  }
  if (!page.providers.length) list.append(element("li", "No providers are configured.", "muted"));
  ask.setProviders(page.providers);
}

/** Forget the kept sign-in of a provider: its next sessions start signed out. */
async function disconnectProvider(provider) {
  const note = $("providers-note");
  try {
    await api("DELETE", `/api/providers/${encodeURIComponent(provider.name)}/connection`);
  } catch (error) {
    note.textContent = `Could not disconnect ${provider.title}: ${error.message}`;
    note.dataset.tone = "error";
    if (error instanceof ApiError && error.status === 401) showLogin();
    return;
  }
  note.textContent = `${provider.title} disconnected: its next sessions start signed out.`;
  note.dataset.tone = "";
  await loadProviders();
}

// --- a new session: create, follow its progress, then view it ----------------------------------

/** Create a session of `provider`, named by the Name box when it holds something. */
async function startSession(provider) {
  const started = performance.now();
  const labelBox = $("new-label");
  const label = labelBox.value.trim();
  const name = label ? `${provider.title} “${label}”` : provider.title;
  page.starting = true;
  renderProviders();
  resetProgress();
  addStep(`Starting ${name}…`, started);
  setStatus("connecting", `Starting ${name}…`);
  let session;
  try {
    const body = label ? { provider: provider.name, label } : { provider: provider.name };
    session = await api("POST", "/api/sessions", body);
  } catch (error) {
    addStep(error.message, started, "error");
    setStatus("error", error.message);
    page.starting = false;
    renderProviders();
    if (error instanceof ApiError && error.status === 401) showLogin();
    else if (error instanceof ApiError && error.status === 422 && label) labelBox.focus();
    return;
  }
  labelBox.value = "";
  page.starting = false;
  renderProviders();
  addStep(`Session ${session.id} created (${session.state})`, started);
  list.put(session);
  watchSession(session, started);
}

/** Open the session the address names, once the session list is known. */
function openFromAddress() {
  const wanted = page.wanted;
  page.wanted = null;
  if (page.viewing === wanted) return;
  const session = list.find(wanted);
  if (!session || FINAL_STATES.has(session.state)) {
    setAddress(page.viewing);
    const why = session
      ? endedMessage(session.state, session.reason)
      : "it is not one of yours, or no longer exists.";
    setStatus("idle", `The session in the address (${wanted}): ${why}`);
    return;
  }
  $("progress").hidden = true;
  watchSession(session, null);
}

/** Follow the session's events; connect the view when it is ready; report when it ends. */
function watchSession(session, started) {
  showPane("live");
  if (page.stopEvents) page.stopEvents();
  if (page.viewing !== session.id) disconnectViews();
  page.viewing = session.id;
  page.label = sessionLabel(session);
  page.endedText = null;
  page.view = chosenView(session.id);
  setAddress(session.id);
  showView(page.view);
  $("viewer-session").textContent = viewerCaption(session);
  setTitle(page.label);
  list.render();
  if (page.signin.sessionId !== session.id) hideSignIn();
  if (session.open_url && !FINAL_STATES.has(session.state)) {
    showSignIn(session.id, session.open_url, started);
  }
  let viewing = false;
  const onState = (state, reason) => {
    list.update(session.id, { state, reason });
    // A hibernated session is asleep: opening its view is what wakes it (about a second).
    if ((state === "ready" || state === "hibernated") && !viewing) {
      viewing = true;
      if (state === "hibernated") setStatus("connecting", ASLEEP_TEXT);
      if (started !== null) addStep("Ready: opening the live view", started);
      connectViewer(session.id, started);
    } else if (FINAL_STATES.has(state) && page.viewing === session.id) {
      const text = endedMessage(state, reason);
      if (started !== null) addStep(text, started, "error");
      disconnectViews();
      enableViewerButtons(false);
      page.endedText = text;
      setStatus("ended", `${text} (${page.label})`);
      showScreenHint(text);
      hideSignIn();
    }
  };
  page.stopEvents = followEvents(
    session.id,
    (facts, type) => {
      if (type === "open-url" && facts.url) showSignIn(session.id, facts.url, started);
      if (facts.message && started !== null && !viewing) addStep(facts.message, started);
      if (facts.state) onState(facts.state, facts.reason);
    },
    async () => {
      // The stream is gone for good (401, 404, or the server went away): ask for the state.
      try {
        const current = await api("GET", `/api/sessions/${encodeURIComponent(session.id)}`);
        onState(current.state, current.reason);
      } catch (error) {
        if (page.viewing === session.id && !activeView().connected) {
          setStatus("error", error.message);
        }
      }
    },
  );
  if (session.state === "ready" || session.state === "hibernated") onState(session.state, null);
}

function connectViewer(sessionId, started) {
  showScreenHint("");
  enableViewerButtons(true);
  if (started !== null) {
    const [view, event, element, step] =
      page.view === "desktop"
        ? [viewer, "firstframe", "screen", "First screen drawn"]
        : [textView, "firstoutput", "terminal", "First text shown"];
    view.addEventListener(
      event,
      () => {
        addStep(step, started);
        $(element).dataset.connectMs = String(Math.round(performance.now() - started));
      },
      { once: true },
    );
  }
  activeView().connect(sessionId, page.label);
}

/** Show the text view or the desktop (the other one stays hidden and disconnected). */
function showView(view) {
  const text = view === "text";
  $("terminal").hidden = !text;
  $("screen").hidden = text;
  $("view-text").setAttribute("aria-pressed", String(text));
  $("view-desktop").setAttribute("aria-pressed", String(!text));
  $("views").dataset.view = view;
}

/** Switch the viewed session to `view`, and remember the choice for that session. */
function switchView(view) {
  const sessionId = page.viewing;
  if (!sessionId || view === page.view) return;
  const wasConnected = activeView().connected || activeView().wanted;
  activeView().disconnect();
  page.view = view;
  rememberView(sessionId, view);
  showView(view);
  if (wasConnected) activeView().connect(sessionId, page.label);
}

/** Show the text view's font size; `change` steps it (and keeps it for the next visit). */
function stepFontSize(change) {
  const size = textView.setFontSize(textView.fontSize + change);
  if (change) localStorage.setItem(FONT_KEY, JSON.stringify(size));
  $("font-size").value = `${size} px`;
  $("font-smaller").disabled = size <= FONT_SIZES.min;
  $("font-larger").disabled = size >= FONT_SIZES.max;
}

function resetProgress() {
  const progress = $("progress");
  progress.replaceChildren();
  progress.hidden = false;
}

function addStep(text, started, tone = "") {
  const item = element("li", undefined, tone);
  item.append(element("span", text), element("span", `+${elapsed(started)}`, "elapsed"));
  $("progress").append(item);
}

// --- the sign-in a session asks for ------------------------------------------------------------

/**
 * Show the link the viewed session asked a browser to open, with a Copy button and the box for
 * the address the browser ends on. The link is set only through DOM properties, and only for
 * http(s): anything else is shown as text.
 */
function showSignIn(sessionId, url, started = null) {
  if (page.viewing !== sessionId || page.hiddenLinks.get(sessionId) === url) return;
  if (page.signin.sessionId === sessionId && page.signin.url === url) return;
  page.signin = { sessionId, url };
  const safe = webLink(url);
  const link = $("signin-link");
  if (safe) link.href = safe;
  else link.removeAttribute("href");
  link.hidden = !safe;
  $("signin-url").value = url;
  $("signin-copy").textContent = "Copy link";
  const unsafe = $("signin-unsafe");
  unsafe.textContent = safe
    ? ""
    : "The session asked to open something that is not a web page (not http or https): " +
      "it is shown as text only.";
  unsafe.hidden = Boolean(safe);
  $("callback-url").value = "";
  showCallbackResult("", "", "");
  $("signin").hidden = false;
  if (started !== null) addStep("The CLI asks you to sign in: open the sign-in page", started);
}

function hideSignIn() {
  page.signin = { sessionId: null, url: null };
  $("signin").hidden = true;
  $("signin-link").removeAttribute("href");
  $("signin-url").value = "";
  $("callback-url").value = "";
  showCallbackResult("", "", "");
}

/** Show the CLI's answer to the pasted address (`tone` ok, error or pending), as text only. */
function showCallbackResult(tone, summary, body) {
  const result = $("callback-result");
  result.dataset.tone = tone;
  delete result.dataset.status;
  result.replaceChildren();
  if (summary) result.append(element("span", summary));
  if (body) result.append(element("pre", body, "callback-body"));
  result.hidden = !summary;
}

async function copySignInLink() {
  const url = page.signin.url;
  if (!url) return;
  const copy = $("signin-copy");
  let copied = false;
  try {
    if (navigator.clipboard) {
      await navigator.clipboard.writeText(url);
      copied = true;
    }
  } catch {
    copied = false;
  }
  const box = $("signin-url");
  if (!copied) {
    box.focus();
    box.select();
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
  }
  copy.textContent = copied ? "Copied" : "Press Ctrl+C to copy";
  setTimeout(() => {
    if (page.signin.url === url) copy.textContent = "Copy link";
  }, COPIED_MS);
}

/** Send the address the browser ended on to the session's CLI; show what it answered. */
async function sendCallback(event) {
  event.preventDefault();
  const sessionId = page.signin.sessionId;
  const url = $("callback-url").value.trim();
  if (!sessionId) return;
  if (!url) {
    showCallbackResult(
      "error",
      "Paste the address first: after signing in, copy it from your browser's address bar.",
      "",
    );
    return;
  }
  const submit = $("callback-submit");
  submit.disabled = true;
  showCallbackResult("pending", "Sending the address to the CLI in the session…", "");
  let callback;
  try {
    callback = await api("POST", `/api/sessions/${encodeURIComponent(sessionId)}/callback`, {
      url,
    });
  } catch (error) {
    if (page.signin.sessionId === sessionId) showCallbackResult("error", error.message, "");
    if (error instanceof ApiError && error.status === 401) showLogin();
    return;
  } finally {
    submit.disabled = false;
  }
  if (page.signin.sessionId !== sessionId) return;
  const ok = callback.status >= 200 && callback.status < 400;
  const result = $("callback-result");
  showCallbackResult(
    ok ? "ok" : "error",
    `The CLI answered ${callback.status}${ok ? "" : ": the sign-in did not finish"}.`,
    callback.body,
  );
  result.dataset.status = String(callback.status);
  // Its sign-in is kept a few seconds later; the card then says Connected.
  setTimeout(loadProviders, REFRESH_MS + 1000);
}

function showScreenHint(text) {
  const hint = $("screen-hint");
  hint.textContent = text;
  hint.hidden = !text;
}

// --- my sessions (sessions.js draws them) ------------------------------------------------------

const list = new SessionList({
  viewing: () => page.viewing,
  reconnect,
  terminate,
  rename: (sessionId, label) =>
    api("PATCH", `/api/sessions/${encodeURIComponent(sessionId)}`, { label }),
  renamed: (session) => {
    if (page.viewing === session.id) renameViewed(session);
  },
  unauthorised: () => showLogin(),
});

function reconnect(session) {
  $("progress").hidden = true;
  watchSession(session, null);
}

/** The viewed session has a new name: say it above the view, in the title and status line. */
function renameViewed(session) {
  page.label = sessionLabel(session);
  $("viewer-session").textContent = viewerCaption(session);
  setTitle(page.label);
  for (const view of [viewer, textView]) {
    if (view.sessionId === session.id) view.rename(page.label);
  }
  if (page.endedText && $("status").dataset.tone === "ended") {
    setStatus("ended", `${page.endedText} (${page.label})`);
  }
}

/** Stop viewing the viewed session (it keeps running unless ended elsewhere). */
function leaveSession() {
  if (page.stopEvents) page.stopEvents();
  page.stopEvents = null;
  disconnectViews();
  enableViewerButtons(false);
  page.viewing = null;
  page.view = null;
  page.endedText = null;
  $("terminal").hidden = true;
  $("screen").hidden = false;
  setAddress(null);
  setTitle(null);
  hideSignIn();
  $("viewer-session").textContent = "";
  showScreenHint("Pick a provider to start a session.");
}

/** End a session (asking first when it has a viewer, unless `confirmed`); hide an ended one. */
async function terminate(session, confirmed = false) {
  const current = list.find(session.id) ?? session;
  const final = FINAL_STATES.has(current.state);
  const watched = current.viewers > 0 || page.viewing === current.id;
  if (!confirmed && watched && !final) {
    list.ask(current.id);
    return;
  }
  if (page.viewing === current.id) leaveSession();
  try {
    if (!final) await api("DELETE", `/api/sessions/${encodeURIComponent(current.id)}`);
  } catch (error) {
    if (!(error instanceof ApiError) || (error.status !== 404 && error.status !== 409)) {
      setStatus("error", `Could not terminate ${sessionLabel(current)}: ${error.message}`);
      list.ask(null);
      return;
    }
  }
  list.remove(current.id);
  setStatus("idle", `Session ${sessionLabel(current)} ${final ? "removed" : "terminated"}.`);
}

// --- the panes: the live view, or Ask (runs.js draws it) -------------------------------------

const ask = new AskPanel({ unauthorised: () => showLogin() });
const hosts = new HostsPanel($("hosts-section"), $("hosts"), $("hosts-note"));

/**
 * Show the live view or Ask beside the sidebar. Ask lies over the view, which keeps its size and
 * its connection while hidden (a hidden box would shrink the session's desktop to nothing), and
 * is inert meanwhile: no focus, no clicks.
 */
function showPane(pane, { focus = false } = {}) {
  if (!PANES.includes(pane)) return;
  const changed = pane !== page.pane;
  page.pane = pane;
  sessionStorage.setItem(PANE_KEY, pane);
  const asking = pane === "ask";
  for (const [tab, selected] of [
    [$("tab-live"), !asking],
    [$("tab-ask"), asking],
  ]) {
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
  }
  $("ask").hidden = !asking;
  $("viewer").inert = asking;
  $("panes").dataset.pane = pane;
  if (asking && changed) ask.refresh();
  if (focus) (asking ? $("tab-ask") : $("tab-live")).focus();
  else if (!asking && changed) activeView().focus();
}

/** Open Ask with `providerName` chosen, the cursor in the prompt. */
function showAsk(providerName) {
  showPane("ask");
  ask.choose(providerName);
}

$("tab-live").addEventListener("click", () => showPane("live"));
$("tab-ask").addEventListener("click", () => showPane("ask"));
// The tabs as one control: the arrow keys (and Home, End) move between them.
$("tablist").addEventListener("keydown", (event) => {
  const moves = { ArrowLeft: -1, ArrowRight: 1, Home: -PANES.length, End: PANES.length };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const index = PANES.indexOf(page.pane) + moves[event.key];
  showPane(PANES[Math.max(0, Math.min(PANES.length - 1, index))], { focus: true });
});

// --- viewer controls ---------------------------------------------------------------------------

function enableViewerButtons(enabled) {
  const buttons = ["focus-button", "clipboard-button", "fullscreen-button", "disconnect-button"];
  for (const id of [...buttons, "view-text", "view-desktop"]) {
    $(id).disabled = !enabled;
  }
}

for (const view of [viewer, textView]) {
  view.addEventListener("status", (event) => {
    if (view === activeView()) setStatus(event.detail.tone, event.detail.text);
  });
  view.addEventListener("ended", (event) => {
    if (view !== activeView()) return;
    page.endedText = event.detail.text;
    enableViewerButtons(false);
    showScreenHint(event.detail.text);
    refresh();
  });
}
// A session without a text terminal (a microVM's, today) is shown as its desktop.
textView.addEventListener("notext", () => {
  if (activeView() !== textView) return;
  switchView("desktop");
  setStatus("connected", `${page.label} has no text view; showing its desktop.`);
});
// A paste into the desktop is typed into the session key by key (viewer.js); one too long to
// type waits in the clipboard box, for the text view or Send to session.
viewer.addEventListener("paste", (event) => {
  const { text, typed } = event.detail;
  if (typed) {
    setStatus("connected", `Pasted ${text.length} characters into ${page.label} (typed).`);
    return;
  }
  $("clipboard-text").value = text;
  $("clipboard").hidden = false;
  $("clipboard-button").setAttribute("aria-expanded", "true");
  setStatus(
    "connected",
    `That paste is too long to type into the desktop: use the Text view (it pastes at once), ` +
      "or Send to session from the clipboard box.",
  );
});
viewer.addEventListener("clipboard", (event) => {
  $("clipboard-text").value = event.detail.text;
  navigator.clipboard?.writeText(event.detail.text).catch(() => {
    // the page may not be allowed to write the system clipboard; the text box still has it
  });
});

$("focus-button").addEventListener("click", () => activeView().focus());
$("view-text").addEventListener("click", () => switchView("text"));
$("view-desktop").addEventListener("click", () => switchView("desktop"));
$("font-smaller").addEventListener("click", () => stepFontSize(-1));
$("font-larger").addEventListener("click", () => stepFontSize(+1));
$("signin-copy").addEventListener("click", copySignInLink);
$("signin-hide").addEventListener("click", () => {
  if (page.signin.sessionId) page.hiddenLinks.set(page.signin.sessionId, page.signin.url);
  hideSignIn();
  activeView().focus();
});
$("callback-form").addEventListener("submit", sendCallback);
$("disconnect-button").addEventListener("click", () => {
  if (page.stopEvents) page.stopEvents();
  page.stopEvents = null;
  disconnectViews();
  enableViewerButtons(false);
  showScreenHint("Disconnected. The session keeps running: use Reconnect in My sessions.");
});
$("clipboard-button").addEventListener("click", () => {
  const panel = $("clipboard");
  panel.hidden = !panel.hidden;
  $("clipboard-button").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) $("clipboard-text").focus();
});
$("clipboard-send").addEventListener("click", () => {
  const text = $("clipboard-text").value;
  if (page.view === "text" && textView.paste(text)) {
    setStatus("connected", `Clipboard pasted into ${page.label}.`);
  } else {
    viewer.sendClipboard(text);
    setStatus(
      "connected",
      "Clipboard sent to the session: paste it there (middle click or Shift+Insert in xterm).",
    );
  }
  activeView().focus();
});
$("fullscreen-button").addEventListener("click", async () => {
  try {
    // The whole page goes full screen with the sidebar folded away, so the status line and
    // the toolbar (with this button) stay visible above the session.
    if (document.fullscreenElement) await document.exitFullscreen();
    else await document.documentElement.requestFullscreen();
  } catch (error) {
    setStatus("error", `Full screen is not available here: ${error.message}`);
  }
});
document.addEventListener("fullscreenchange", () => {
  const full = document.fullscreenElement !== null;
  document.body.classList.toggle("full-screen", full);
  $("fullscreen-button").textContent = full ? "Exit full screen" : "Full screen";
  activeView().focus();
});
$("signout").addEventListener("click", signOut);
$("login-form").addEventListener("submit", (event) => {
  // The server's /login sets the cookie and redirects back here; never keep the token around.
  event.preventDefault();
  const token = $("login-token").value.trim();
  if (token) location.assign(`/login?token=${encodeURIComponent(token)}`);
});

window.addEventListener("hashchange", () => {
  const wanted = sessionInAddress();
  if (wanted && wanted !== page.viewing) {
    page.wanted = wanted;
    refresh();
  }
});

stepFontSize(0);
if (!page.wanted && sessionStorage.getItem(PANE_KEY) === "ask") showPane("ask");
refresh();
page.refreshTimer = setInterval(refresh, REFRESH_MS);
