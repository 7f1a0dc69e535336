// The Patronus API from TypeScript, through types generated from the controller's own OpenAPI
// document by openapi-typescript and the openapi-fetch client (standard npm packages): log in,
// list the sites, create a policy, and receive and verify the webhook the policy's change sets
// off. Compiled with tsc --strict, run with node.
//
// Run by `crates/patronus/tests/clients.rs` against a live controller; by hand:
//
//   npx openapi-typescript https://CONTROLLER/api/v1/openapi.json -o api.d.ts
//   npx tsc -p . && NODE_EXTRA_CA_CERTS=cert.pem PATRONUS_URL=https://CONTROLLER \
//     PATRONUS_EMAIL=... PATRONUS_PASSWORD=... node example.js
//
// The webhook receiver listens on 127.0.0.1: the controller must be allowed to post there
// (`webhook_allowed_networks`, PATRONUS_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8).

import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingHttpHeaders } from "node:http";
import type { AddressInfo } from "node:net";
import createClient from "openapi-fetch";
import type { paths } from "./api";

/** X-Patronus-Signature: t=<unix seconds>,v1=<hex of HMAC-SHA256(secret, "<t>." + body)>. */
export function verify(secret: string, header: string, body: Buffer, toleranceS = 300): boolean {
  const parts = new Map(header.split(",").map((p) => p.split("=", 2) as [string, string]));
  const t = parts.get("t");
  const sig = parts.get("v1");
  if (t === undefined || sig === undefined) return false;
  if (Math.abs(Date.now() / 1000 - Number(t)) > toleranceS) return false; // a replay
  const mac = createHmac("sha256", secret).update(`${t}.`).update(body).digest();
  const given = Buffer.from(sig, "hex");
  return given.length === mac.length && timingSafeEqual(given, mac);
}

type Delivery = { headers: IncomingHttpHeaders; body: Buffer };

/** A webhook receiver on a free port of 127.0.0.1. */
async function receiver(): Promise<{ port: number; next: () => Promise<Delivery>; close: () => void }> {
  const waiting: ((d: Delivery) => void)[] = [];
  const got: Delivery[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const d = { headers: req.headers, body: Buffer.concat(chunks) };
      const w = waiting.shift();
      if (w) w(d);
      else got.push(d);
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
  const next = () =>
    new Promise<Delivery>((ok) => {
      const d = got.shift();
      if (d) ok(d);
      else waiting.push(ok);
    });
  return { port: (server.address() as AddressInfo).port, next, close: () => server.close() };
}

function env(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

async function main(): Promise<void> {
  const baseUrl = env("PATRONUS_URL");
  const anon = createClient<paths>({ baseUrl });
  const login = await anon.POST("/api/v1/auth/login", {
    body: { email: env("PATRONUS_EMAIL"), password: env("PATRONUS_PASSWORD") },
  });
  if (!login.data) throw new Error(`login: ${JSON.stringify(login.error)}`);
  const api = createClient<paths>({
    baseUrl,
    headers: { authorization: `Bearer ${login.data.access_token}` },
  });

  const sites = await api.GET("/api/v1/sites", { params: { query: { limit: 100 } } });
  if (!sites.data) throw new Error(`sites: ${JSON.stringify(sites.error)}`);
  console.log("sites:", sites.data.total, sites.data.items.map((s) => s.name).sort());

  const hook = await receiver();
  const created = await api.POST("/api/v1/webhooks", {
    body: { url: `http://127.0.0.1:${hook.port}/hook`, events: ["config.changed"], description: "typescript example" },
  });
  const secret = created.data?.secret;
  if (!secret) throw new Error(`webhook: ${JSON.stringify(created.error)}`);

  const stamp = Math.floor(Date.now() / 1000);
  const policy = await api.POST("/api/v1/policies", {
    body: {
      name: `ts-voice-${stamp}`,
      order: 20_000 + (stamp % 100_000),
      class: "realtime",
      match: { protocol: "udp", dst_ports: ["5061"] },
    },
  });
  if (!policy.data) throw new Error(`policy: ${JSON.stringify(policy.error)}`);
  console.log("policy:", policy.data.name.replace(/-\d+$/, ""), "created");

  const deadline = Date.now() + 30_000;
  for (;;) {
    const left = deadline - Date.now();
    const d = await Promise.race([
      hook.next(),
      new Promise<never>((_, no) => setTimeout(() => no(new Error("no webhook in 30 s")), Math.max(left, 1))),
    ]);
    if (!d.body.includes("policy.create")) continue;
    const signature = String(d.headers["x-patronus-signature"]);
    if (!verify(secret, signature, d.body)) throw new Error("the signature does not verify");
    if (verify(secret, signature, Buffer.concat([d.body, Buffer.from(" ")]))) throw new Error("a changed body verified");
    console.log("webhook:", d.headers["x-patronus-event"], "signature verified");
    break;
  }
  hook.close();
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
