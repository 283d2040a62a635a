// The text view: the session's terminal in xterm.js, over the WebSocket
// /api/sessions/{id}/tty (docs/api.md). Binary messages carry the bytes both ways (keystrokes
// and pastes in, the terminal's output out); a text message {"type": "resize", "cols", "rows"}
// tells the session the view's size whenever fitting it to its box changes it. Reconnected with
// backoff while the session is alive, like the desktop view (reconnect.js).

import { api, ttyPath, webLink } from "./api.js";
import { backoff, explainDrop } from "./reconnect.js";

const XTERM = "/dashboard/remote-cli/xterm";
export const FONT_FAMILY = '"DejaVu Sans Mono", "Noto Sans Mono", monospace';
// DejaVu Sans Mono's capitals are 0.73 em tall: 15 px draws them 10.9 CSS px tall.
export const FONT_SIZES = { min: 10, default: 15, max: 32 };
// The desktop's dark theme (xterm in the session), so both views look alike.
export const THEME = {
  background: "#1e1e1e",
  foreground: "#d4d4d4",
  cursor: "#d4d4d4",
  cursorAccent: "#1e1e1e",
  selectionBackground: "#264f78",
  black: "#1e1e1e",
  red: "#f44747",
  green: "#6a9955",
  yellow: "#d7ba7d",
  blue: "#569cd6",
  magenta: "#c586c0",
  cyan: "#4ec9b0",
  white: "#d4d4d4",
  brightBlack: "#808080",
  brightRed: "#f14c4c",
  brightGreen: "#23d18b",
  brightYellow: "#f5f543",
  brightBlue: "#3b8eea",
  brightMagenta: "#d670d6",
  brightCyan: "#29b8db",
  brightWhite: "#ffffff",
};
// Tell the session the new size once the box has kept it this long (a window being dragged).
const RESIZE_DEBOUNCE_MS = 150;

let modules = null;

/** Import xterm.js and its add-ons once; on failure say how to install them. */
async function loadXterm() {
  if (modules) return modules;
  try {
    const [core, fit, links, unicode] = await Promise.all([
      import(`${XTERM}/xterm.js`),
      import(`${XTERM}/addon-fit.js`),
      import(`${XTERM}/addon-web-links.js`),
      import(`${XTERM}/addon-unicode11.js`),
    ]);
    modules = {
      Terminal: core.Terminal,
      FitAddon: fit.FitAddon,
      WebLinksAddon: links.WebLinksAddon,
      Unicode11Addon: unicode.Unicode11Addon,
    };
    return modules;
  } catch (error) {
    let message = `The text view could not be loaded (${error.message}): run \`make up\`.`;
    try {
      const response = await fetch(`${XTERM}/xterm.js`);
      if (!response.ok) message = (await response.text()).trim();
    } catch {
      // keep the generic message: the server itself is unreachable
    }
    throw new Error(message);
  }
}

/** Open an http(s) link printed in the terminal in a new tab, apart from this page. */
function openLink(_event, uri) {
  const safe = webLink(uri);
  if (safe) window.open(safe, "_blank", "noopener,noreferrer");
}

/** The font size to use: `size` clamped to FONT_SIZES, or the default when it is no number. */
export function fontSize(size) {
  const value = Math.round(Number(size));
  if (!Number.isFinite(value) || value === 0) return FONT_SIZES.default;
  return Math.min(FONT_SIZES.max, Math.max(FONT_SIZES.min, value));
}

/** The resize message for a terminal of `cols` × `rows` (the server takes 1..1000 each). */
export function resizeMessage(cols, rows) {
  const clamp = (value) => Math.min(1000, Math.max(1, Math.floor(value)));
  return JSON.stringify({ type: "resize", cols: clamp(cols), rows: clamp(rows) });
}

/**
 * Shows sessions as text in `container`. Events, as the desktop view's: "status" (detail
 * {tone, text}), "firstoutput", "ended" (detail {text}).
 */
export class TextView extends EventTarget {
  constructor(container, { fontSize: size = FONT_SIZES.default } = {}) {
    super();
    this.container = container;
    this.fontSize = fontSize(size);
    this.terminal = null;
    this.fit = null;
    this.socket = null;
    this.sessionId = null;
    this.label = "";
    this.wanted = false;
    this.attempt = 0;
    this.generation = 0;
    this.retryTimer = null;
    this.resizeTimer = null;
    this.sentSize = "";
    this.encoder = new TextEncoder();
    new ResizeObserver(() => this.refit()).observe(container);
  }

  get connected() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** Show `sessionId` (called `label` in the status), replacing any session shown before. */
  async connect(sessionId, label = sessionId) {
    this.disconnect();
    this.sessionId = sessionId;
    this.label = label;
    this.wanted = true;
    this.attempt = 0;
    await this.open();
  }

  /** Stop showing the session (the session itself keeps running). */
  disconnect() {
    this.wanted = false;
    this.generation += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const socket = this.socket;
    this.socket = null;
    if (socket?.readyState === WebSocket.CONNECTING) {
      // Closing a socket still connecting is a browser console error: close it once open
      // (its listeners see a newer generation and ignore it).
      socket.addEventListener("open", () => socket.close(1000, "viewer closed"));
    } else if (socket) {
      socket.close(1000, "viewer closed");
    }
    this.container.dataset.firstOutput = "";
  }

  focus() {
    this.terminal?.focus();
  }

  /** Paste `text` into the session as the terminal would (bracketed when the CLI asked so). */
  paste(text) {
    if (!this.terminal || !this.connected) return false;
    this.terminal.paste(text);
    return true;
  }

  /** Change the font size (kept by the page); the terminal refits to its box. */
  setFontSize(size) {
    this.fontSize = fontSize(size);
    if (this.terminal) {
      this.terminal.options.fontSize = this.fontSize;
      this.refit();
    }
    return this.fontSize;
  }

  status(tone, text) {
    this.dispatchEvent(new CustomEvent("status", { detail: { tone, text } }));
  }

  /** Call the session `label` from now on; a connected view says so at once. */
  rename(label) {
    this.label = label;
    if (this.connected) this.status("connected", this.connectedText());
  }

  connectedText() {
    return `Connected to ${this.label} (text): type here.`;
  }

  /** Create the terminal once, in the container, with the page's font and theme. */
  async ensureTerminal() {
    if (this.terminal) return;
    const { Terminal, FitAddon, WebLinksAddon, Unicode11Addon } = await loadXterm();
    // Measure the cells with the font itself, not the fallback drawn while it loads.
    try {
      await Promise.all([
        document.fonts.load(`${this.fontSize}px "DejaVu Sans Mono"`),
        document.fonts.load(`bold ${this.fontSize}px "DejaVu Sans Mono"`),
      ]);
    } catch {
      // the fallback fonts measure correctly too
    }
    if (this.terminal) return;
    const terminal = new Terminal({
      allowProposedApi: true, // the unicode11 add-on registers a width table
      cursorBlink: true,
      fontFamily: FONT_FAMILY,
      fontSize: this.fontSize,
      theme: THEME,
      scrollback: 5000,
      linkHandler: { activate: openLink, allowNonHttpProtocols: false },
    });
    this.fit = new FitAddon();
    terminal.loadAddon(this.fit);
    terminal.loadAddon(new WebLinksAddon(openLink));
    terminal.loadAddon(new Unicode11Addon());
    terminal.unicode.activeVersion = "11";
    terminal.open(this.container);
    terminal.onData((data) => this.send(this.encoder.encode(data)));
    terminal.onBinary((data) => this.send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
    terminal.onResize(() => this.queueResize());
    this.terminal = terminal;
    this.refit();
  }

  send(bytes) {
    if (this.connected) this.socket.send(bytes);
  }

  /** Fit the terminal to its box (when it is shown); a size change is sent once it settles. */
  refit() {
    if (!this.terminal || !this.fit) return;
    const { width, height } = this.container.getBoundingClientRect();
    if (width < 1 || height < 1) return;
    try {
      this.fit.fit();
    } catch {
      // not measurable yet (hidden): the next resize fits it
    }
    this.queueResize();
  }

  queueResize() {
    clearTimeout(this.resizeTimer);
    this.resizeTimer = setTimeout(() => this.sendSize(), RESIZE_DEBOUNCE_MS);
  }

  sendSize(force = false) {
    if (!this.terminal || !this.connected) return;
    const message = resizeMessage(this.terminal.cols, this.terminal.rows);
    if (message === this.sentSize && !force) return;
    this.sentSize = message;
    this.socket.send(message);
    this.container.dataset.size = `${this.terminal.cols}x${this.terminal.rows}`;
  }

  async open() {
    const generation = this.generation;
    const sessionId = this.sessionId;
    this.status(this.attempt ? "reconnecting" : "connecting", `Opening ${this.label} as text…`);
    let ticket;
    try {
      await this.ensureTerminal();
      ticket = await api("POST", `/api/sessions/${encodeURIComponent(sessionId)}/ticket`);
    } catch (error) {
      if (generation === this.generation) await this.dropped(generation, { error });
      return;
    }
    if (generation !== this.generation) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}${ttyPath(sessionId, ticket)}`, [
      "tty",
    ]);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    let opened = false;
    socket.addEventListener("open", () => {
      if (generation !== this.generation) return;
      opened = true;
      this.attempt = 0;
      // The session redraws its screen for a new viewer: start from a clean terminal.
      this.terminal.reset();
      this.refit();
      this.sendSize(true);
      this.status("connected", this.connectedText());
      this.terminal.focus();
    });
    socket.addEventListener("message", (event) => {
      if (generation !== this.generation || typeof event.data === "string") return;
      this.terminal.write(new Uint8Array(event.data));
      if (this.container.dataset.firstOutput !== "drawn") {
        this.container.dataset.firstOutput = "drawn";
        this.dispatchEvent(new Event("firstoutput"));
      }
    });
    socket.addEventListener("close", (event) => {
      if (generation !== this.generation) return;
      this.socket = null;
      this.sentSize = "";
      const close = { code: event.code, reason: event.reason, opened };
      this.dropped(generation, { close });
    });
  }

  async dropped(generation, { close = null, error = null }) {
    this.container.dataset.firstOutput = "";
    if (!this.wanted) {
      this.status("idle", `Disconnected from ${this.label} (it keeps running).`);
      return;
    }
    if (close && close.code === 1011 && close.reason.includes("has no text terminal")) {
      // e.g. a microVM session: the page shows its desktop instead (switching disconnects us)
      this.status("idle", `${this.label} has no text view.`);
      this.dispatchEvent(new CustomEvent("notext", { detail: { reason: close.reason } }));
      return;
    }
    const { text, retry } = await explainDrop(this.sessionId, close, error, "the session");
    if (generation !== this.generation) return;
    if (!retry) {
      this.wanted = false;
      this.status(retry === null ? "error" : "ended", `${text} (${this.label})`);
      this.dispatchEvent(new CustomEvent("ended", { detail: { text } }));
      return;
    }
    const delay = backoff(this.attempt);
    this.attempt += 1;
    const seconds = (delay / 1000).toFixed(1);
    this.status(
      "reconnecting",
      `${text} Reconnecting to ${this.label} in ${seconds} s (attempt ${this.attempt})…`,
    );
    this.retryTimer = setTimeout(() => {
      if (generation === this.generation && this.wanted) this.open();
    }, delay);
  }
}
