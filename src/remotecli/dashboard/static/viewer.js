// The desktop view: one noVNC RFB client at a time, reconnected with backoff while its session is
// alive (reconnect.js says in words why it dropped). The session's desktop takes the size of the
// view (noVNC's SetDesktopSize, debounced), so nothing is scaled or letterboxed once the server
// has answered; a paste (Ctrl/Cmd+V) is typed into the session key by key.

import { api } from "./api.js";
import { backoff, explainDrop } from "./reconnect.js";

// Raw, CopyRect, RRE, Hextile, Zlib, Tight, ZRLE, JPEG, H.264, TightPNG: rectangles of pixels.
const PIXEL_ENCODINGS = new Set([0, 1, 2, 5, 6, 7, 16, 21, 50, -260]);
// Ask the session for a new desktop size once the view has kept its size this long.
const RESIZE_DEBOUNCE_MS = 250;
// Longer pastes are not typed key by key: the text view pastes them at once.
export const MAX_TYPED_PASTE = 4096;
// X keysyms: Return, Tab, and the modifiers released while a paste is typed.
const XK_RETURN = 0xff0d;
const XK_TAB = 0xff09;
const MODIFIER_CODES = /^(Control|Meta|Alt|OS|Shift)(Left|Right)?$/;

/** The X keysym that types `character` (Latin-1 as is, other Unicode as 0x01000000 + code). */
export function keysymFor(character) {
  const code = character.codePointAt(0);
  if (character === "\n" || character === "\r") return XK_RETURN;
  if (character === "\t") return XK_TAB;
  if (code < 0x20 || code === 0x7f) return null;
  if (code <= 0xff) return code;
  return 0x01000000 + code;
}

/**
 * Connects the screen element to sessions. Events: "status" (detail {tone, text}),
 * "clipboard" (detail {text}), "firstframe", "ended" (detail {text}), and "paste" (detail
 * {text, typed}: false when the text was too long to type).
 */
export class Viewer extends EventTarget {
  constructor(screen, loadRfb) {
    super();
    this.screen = screen;
    this.loadRfb = loadRfb;
    this.rfb = null;
    this.sessionId = null;
    this.wanted = false;
    this.attempt = 0;
    this.generation = 0;
    this.retryTimer = null;
    this.lastClose = null;
    this.label = "";
    screen.addEventListener("keydown", (event) => this.keepPasteKey(event), true);
    screen.addEventListener("paste", (event) => this.paste(event));
    new ResizeObserver(() => this.fitDesktop()).observe(screen);
  }

  get connected() {
    return this.rfb !== null && this.rfb.__connected === true;
  }

  /** Show `sessionId` (called `label` in the status) in the screen, replacing any before. */
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
    const rfb = this.rfb;
    this.rfb = null;
    if (rfb) rfb.disconnect();
    this.screen.dataset.firstFrame = "";
    this.screen.dataset.resizable = "";
  }

  focus() {
    if (this.rfb) this.rfb.focus();
  }

  sendClipboard(text) {
    if (this.rfb) this.rfb.clipboardPasteFrom(text);
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
    return `Connected to ${this.label} (desktop): click it or press Focus keyboard to type.`;
  }

  async open() {
    const generation = this.generation;
    const sessionId = this.sessionId;
    const opening = `Opening the desktop of ${this.label}…`;
    this.status(this.attempt ? "reconnecting" : "connecting", opening);
    let RFB;
    let ticket;
    try {
      RFB = await this.loadRfb();
      ticket = await api("POST", `/api/sessions/${encodeURIComponent(sessionId)}/ticket`);
    } catch (error) {
      if (generation === this.generation) await this.dropped(generation, { error });
      return;
    }
    if (generation !== this.generation) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}${ticket.vnc_path}`;
    const socket = new WebSocket(url, ["binary"]);
    socket.addEventListener("close", (event) => {
      this.lastClose = { code: event.code, reason: event.reason };
    });
    this.lastClose = null;
    const rfb = new RFB(this.screen, socket, { shared: true });
    // Scaled only until the desktop has the view's size (or for good, when the server cannot
    // resize: x11vnc, a microVM's VNC).
    rfb.scaleViewport = true;
    rfb.focusOnClick = true;
    // Text is the picture: the least lossy JPEG TigerVNC offers (the default, 6, smudges
    // antialiased letters; a session's terminal compresses well losslessly anyway).
    rfb.qualityLevel = 9;
    this.rfb = rfb;
    this.watchFirstFrame(rfb);
    this.followDesktopSize(rfb);
    rfb.resizeSession = true;
    rfb.addEventListener("connect", () => {
      if (generation !== this.generation) return;
      rfb.__connected = true;
      this.attempt = 0;
      this.status("connected", this.connectedText());
      rfb.focus();
    });
    rfb.addEventListener("disconnect", () => {
      rfb.__connected = false;
      if (generation === this.generation) this.dropped(generation, { close: this.lastClose });
    });
    rfb.addEventListener("securityfailure", (event) => {
      this.lastClose = { code: 0, reason: `VNC security failure: ${event.detail.reason ?? ""}` };
    });
    rfb.addEventListener("clipboard", (event) => {
      this.dispatchEvent(new CustomEvent("clipboard", { detail: { text: event.detail.text } }));
    });
  }

  /**
   * Let the session's desktop follow the view: noVNC asks for the view's size (SetDesktopSize)
   * when it changes, here at most once per RESIZE_DEBOUNCE_MS of quiet, and the canvas is
   * scaled only while the desktop's size differs from the view's.
   */
  followDesktopSize(rfb) {
    const request = rfb._requestRemoteResize;
    const resize = rfb._resize;
    const answer = rfb._handleExtendedDesktopSize;
    if ([request, resize, answer].some((method) => typeof method !== "function")) return;
    const viewer = this;
    let timer = null;
    rfb._requestRemoteResize = function (...args) {
      clearTimeout(timer);
      timer = setTimeout(() => {
        if (viewer.rfb === rfb) request.apply(rfb, args);
      }, RESIZE_DEBOUNCE_MS);
    };
    rfb._resize = function (...args) {
      resize.apply(this, args);
      if (viewer.rfb === rfb) viewer.fitDesktop();
    };
    // The server's answer to our request (x = 1): y = 0 applied it, anything else refused it
    // (x11vnc refuses; the view then stays scaled). Noted on the screen element for the tests.
    rfb._handleExtendedDesktopSize = function (...args) {
      const { x, y } = this._FBU;
      const done = answer.apply(this, args);
      if (done && x === 1 && viewer.rfb === rfb) {
        viewer.screen.dataset.resizable = y === 0 ? "yes" : `refused (${y})`;
      }
      return done;
    };
  }

  /** Scale the canvas while the desktop and the view differ in size; draw it 1:1 once equal. */
  fitDesktop() {
    const rfb = this.rfb;
    if (!rfb || !rfb._fbWidth) return;
    const { width, height } = this.screen.getBoundingClientRect();
    if (width < 1 || height < 1) return;
    const matches =
      Math.abs(rfb._fbWidth - Math.floor(width)) <= 1 &&
      Math.abs(rfb._fbHeight - Math.floor(height)) <= 1;
    if (rfb.scaleViewport === matches) rfb.scaleViewport = !matches;
    this.screen.dataset.desktopSize = `${rfb._fbWidth}x${rfb._fbHeight}`;
  }

  /** Let Ctrl/Cmd+V reach the browser (a paste event) instead of noVNC (a ^V keystroke). */
  keepPasteKey(event) {
    const paste = (event.ctrlKey || event.metaKey) && !event.altKey && event.code === "KeyV";
    if (paste && this.connected) event.stopPropagation();
  }

  /** Type pasted text into the session, key by key, with the held modifiers released. */
  paste(event) {
    const text = event.clipboardData?.getData("text/plain") ?? "";
    if (!this.connected || !text) return;
    event.preventDefault();
    this.dispatchEvent(new CustomEvent("paste", { detail: { text, typed: this.type(text) } }));
  }

  /** Send `text` as key presses; false (nothing sent) when it is too long to type. */
  type(text) {
    const rfb = this.rfb;
    const characters = [...text.replace(/\r\n/g, "\n")];
    if (!rfb || characters.length > MAX_TYPED_PASTE) return false;
    // Ctrl (or Cmd) is still down for the session: release it while typing, then press it again
    // so the session and noVNC agree when the user lets go.
    const held = Object.entries(rfb._keyboard?._keyDownList ?? {}).filter(([code]) =>
      MODIFIER_CODES.test(code),
    );
    for (const [code, keysym] of held) rfb.sendKey(keysym, code, false);
    for (const character of characters) {
      const keysym = keysymFor(character);
      if (keysym === null) continue;
      rfb.sendKey(keysym, null, true);
      rfb.sendKey(keysym, null, false);
    }
    for (const [code, keysym] of held) rfb.sendKey(keysym, code, true);
    return true;
  }

  // noVNC has no public "first framebuffer drawn" event: wrap the two methods that handle one
  // rectangle and finish one update, so the page (and the benchmark) learn when the first
  // update carrying pixels (not only a desktop size or a cursor) is on screen.
  watchFirstFrame(rfb) {
    const handleRect = rfb._handleRect;
    const framebufferUpdate = rfb._framebufferUpdate;
    if (typeof handleRect !== "function" || typeof framebufferUpdate !== "function") return;
    const viewer = this;
    let pixels = false;
    rfb._handleRect = function (...args) {
      const encoding = this._FBU.encoding;
      const done = handleRect.apply(this, args);
      if (done && PIXEL_ENCODINGS.has(encoding)) pixels = true;
      return done;
    };
    rfb._framebufferUpdate = function (...args) {
      const done = framebufferUpdate.apply(this, args);
      if (done && pixels && viewer.rfb === rfb && viewer.screen.dataset.firstFrame !== "drawn") {
        viewer.screen.dataset.firstFrame = "drawn";
        viewer.dispatchEvent(new Event("firstframe"));
      }
      return done;
    };
  }

  async dropped(generation, { close = null, error = null }) {
    if (this.rfb) this.rfb.__connected = false;
    this.rfb = null;
    this.screen.dataset.firstFrame = "";
    if (!this.wanted) {
      this.status("idle", `Disconnected from ${this.label} (it keeps running).`);
      return;
    }
    const { text, retry } = await explainDrop(this.sessionId, close, error);
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
