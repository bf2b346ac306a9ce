// Drive one Node SSE client against a stream URL and report what it surfaces, one JSON
// object per line on stdout: {"kind": "open" | "event" | "error" | "stopped", ...}.
//
//   node drive.mjs eventsource|fetch-event-source URL close-on-finish|keep-open
//
// With close-on-finish the client is closed after the `finish` event, as the demo page does;
// with keep-open it follows its own reconnect logic until it gives up by itself.
import { createRequire } from "node:module";

const [clientName, url, mode] = process.argv.slice(2);
const closeOnFinish = mode === "close-on-finish";
const NAMED_EVENTS = ["finish", "gap", "note"];

function report(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

function driveEventSource() {
  const { EventSource } = createRequire(import.meta.url)("eventsource");
  const source = new EventSource(url);
  const onEvent = (event) => {
    report({ kind: "event", type: event.type, data: event.data, id: event.lastEventId });
    if (closeOnFinish && event.type === "finish") {
      source.close();
      report({ kind: "stopped", reason: "closed on finish" });
    }
  };
  source.addEventListener("message", onEvent);
  for (const name of NAMED_EVENTS) source.addEventListener(name, onEvent);
  source.addEventListener("open", () => report({ kind: "open" }));
  source.addEventListener("error", (event) => {
    report({ kind: "error", status: event.code ?? null, readyState: source.readyState });
    if (source.readyState === EventSource.CLOSED) {
      report({ kind: "stopped", reason: "closed by the client after an error" });
    }
  });
}

// fetch-event-source is written for browsers: it reads `window` and `document`.
class Stop extends Error {}
class Reconnect extends Error {}

async function driveFetchEventSource() {
  globalThis.window ??= globalThis;
  globalThis.document ??= { addEventListener() {}, removeEventListener() {}, hidden: false };
  const { fetchEventSource } = createRequire(import.meta.url)("@microsoft/fetch-event-source");
  const controller = new AbortController();
  try {
    await fetchEventSource(url, {
      signal: controller.signal,
      openWhenHidden: true,
      fetch: globalThis.fetch,
      // The library's documented pattern: the application decides what a response means.
      async onopen(response) {
        report({ kind: "open", status: response.status });
        const type = response.headers.get("content-type") ?? "";
        if (response.status === 204) throw new Stop("204: nothing more to send");
        if (!response.ok || !type.startsWith("text/event-stream")) {
          throw new Stop(`unexpected response ${response.status} ${type}`);
        }
      },
      onmessage(message) {
        report({
          kind: "event", type: message.event, data: message.data, id: message.id,
          retry: message.retry ?? null,
        });
        if (closeOnFinish && message.event === "finish") {
          controller.abort();
          report({ kind: "stopped", reason: "closed on finish" });
        }
      },
      // A stream the server ended is reconnected, as EventSource does.
      onclose() {
        throw new Reconnect("the server ended the stream");
      },
      // undefined: wait for the interval the server's `retry:` set, then reconnect.
      onerror(error) {
        report({ kind: "error", message: String(error.message ?? error) });
        if (error instanceof Stop) throw error;
        return undefined;
      },
    });
  } catch (error) {
    if (!(error instanceof Stop)) throw error;
    report({ kind: "stopped", reason: error.message });
  }
}

if (clientName === "eventsource") {
  driveEventSource();
} else if (clientName === "fetch-event-source") {
  await driveFetchEventSource();
} else {
  process.stderr.write(`unknown client ${clientName}\n`);
  process.exit(2);
}
