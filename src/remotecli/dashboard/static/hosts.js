// The admin's view of the hosts sessions run on (the cluster driver): each host's name, whether
// it is up, its free and total session slots, and this controller's sessions on it, from
// GET /readyz's details (the admin's login may read them). Shown only to the admin, and only
// when the driver has hosts (the local and qemu drivers run sessions on this one machine).
// Host names and session ids reach the page through textContent only.

import { api } from "./api.js";
import { element } from "./elements.js";

const REFRESH_MS = 5000;

/** The "Hosts" section of the sidebar: `section` holds it, `list` gets one item per host. */
export class HostsPanel {
  constructor(section, list, note) {
    this.section = section;
    this.list = list;
    this.note = note;
    this.timer = null;
  }

  /** Show the hosts now and every few seconds, until stop(). */
  start() {
    if (this.timer !== null) return;
    this.load();
    this.timer = setInterval(() => this.load(), REFRESH_MS);
  }

  /** Hide the section and stop refreshing it (signed out). */
  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.section.hidden = true;
    this.list.replaceChildren();
  }

  async load() {
    let ready;
    try {
      ready = await api("GET", "/readyz");
    } catch (error) {
      this.note.textContent = `Hosts not read: ${error.message}`;
      return;
    }
    if (!Array.isArray(ready?.hosts)) {
      this.section.hidden = true;
      return;
    }
    this.note.textContent = ready.hosts.length ? "" : "No host has joined the cluster yet.";
    this.list.replaceChildren(...ready.hosts.map(hostItem));
    this.section.hidden = false;
  }
}

/** One host as a list item: name, up or lost, free of total slots, its sessions. */
function hostItem(host) {
  const item = element("li", undefined, "host");
  item.append(element("strong", host.name));
  const state = host.up ? "up" : "lost";
  const facts = `${state} · ${host.address} · ${host.slots_free} of ${host.slots} slots free`;
  item.append(element("span", facts, host.up ? "muted" : "host-lost"));
  const sessions = host.sessions.length ? host.sessions.join(", ") : "no session";
  item.append(element("span", `sessions: ${sessions}`, "muted host-sessions"));
  return item;
}
