// The Node.js peer of the gateway benchmark: node-http-proxy forwarding HTTP and WebSocket.
// Usage: node bench/peers/http_proxy.js LISTEN_PORT UPSTREAM_URL
// It proxies everything to UPSTREAM_URL, as the original remote-cli's custom server did, and
// answers 502 (HTTP) or closes the socket (WebSocket) when the upstream fails.
"use strict";

const http = require("http");
const httpProxy = require("http-proxy");

const [port, target] = process.argv.slice(2);
const proxy = httpProxy.createProxyServer({ target, ws: true, xfwd: true });

proxy.on("error", (err, req, res) => {
  if (res && typeof res.writeHead === "function" && !res.headersSent) {
    res.writeHead(502, { "Content-Type": "text/plain" });
    res.end(`upstream error: ${err.code || err.message}\n`);
  } else if (res && typeof res.destroy === "function") {
    res.destroy();
  }
});

const server = http.createServer((req, res) => proxy.web(req, res));
server.on("upgrade", (req, socket, head) => proxy.ws(req, socket, head));
server.listen(Number(port), "127.0.0.1", 4096, () => console.log("ready"));

process.on("SIGTERM", () => process.exit(0));
