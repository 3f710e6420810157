import * as assert from "node:assert/strict";
import { test } from "node:test";
import type { ServerStatus } from "../../src/protocol";
import { modelLabel, renderStatus, ShowLogCommand, ToggleCommand } from "../../src/statusBar";

const ready: ServerStatus = { state: "ready", model: "/models/starcoder2-3b", builtin: false, device: "cuda:0", dtype: "bfloat16" };

test("the model is named by its folder, a hub id as is, the built-in one marked", () => {
  assert.equal(modelLabel(ready), "starcoder2-3b");
  assert.equal(modelLabel({ ...ready, model: "bigcode/starcoder2-3b" }), "bigcode/starcoder2-3b");
  assert.equal(modelLabel({ ...ready, model: "tiny-stablelm", builtin: true }), "tiny-stablelm (built-in)");
});

test("starting: a spinner, click toggles", () => {
  const rendered = renderStatus({ phase: "starting", paused: false });
  assert.match(rendered.text, /loading~spin/);
  assert.match(rendered.tooltip, /Starting the server/);
  assert.equal(rendered.command, ToggleCommand);
});

test("loading shows the $/progress percentage and message", () => {
  const rendered = renderStatus({
    phase: "running",
    paused: false,
    server: { ...ready, state: "loading" },
    progress: { title: "Loading", message: "layer 12 of 30", percentage: 41.6 },
  });
  assert.equal(rendered.text, "$(loading~spin) StableLM 42%");
  assert.match(rendered.tooltip, /Loading starcoder2-3b: layer 12 of 30/);
});

test("progress reported after ready is ignored", () => {
  const rendered = renderStatus({ phase: "running", paused: false, server: ready, progress: { percentage: 90 } });
  assert.equal(rendered.text, "$(sparkle) starcoder2-3b");
});

test("ready shows the model and where it runs", () => {
  const rendered = renderStatus({ phase: "running", paused: false, server: ready });
  assert.equal(rendered.text, "$(sparkle) starcoder2-3b");
  assert.match(rendered.tooltip, /cuda:0 \(bfloat16\)/);
  assert.match(rendered.tooltip, /Click to pause/);
  assert.equal(rendered.warning, false);
});

test("paused by the user or by the server", () => {
  assert.equal(renderStatus({ phase: "running", paused: true, server: ready }).text, "$(debug-pause) starcoder2-3b");
  assert.equal(renderStatus({ phase: "running", paused: false, server: { ...ready, state: "paused" } }).text, "$(debug-pause) starcoder2-3b");
});

test("a load error is a warning that opens the log", () => {
  const rendered = renderStatus({ phase: "running", paused: false, server: { ...ready, state: "error", message: "no such checkpoint" } });
  assert.equal(rendered.text, "$(error) StableLM");
  assert.match(rendered.tooltip, /no such checkpoint/);
  assert.equal(rendered.command, ShowLogCommand);
  assert.equal(rendered.warning, true);
});

test("a stopped server says why", () => {
  const rendered = renderStatus({ phase: "stopped", paused: false, error: "spawn stablelm-lsp ENOENT" });
  assert.match(rendered.tooltip, /ENOENT/);
  assert.equal(rendered.command, ShowLogCommand);
});

test("untrusted: no server, click manages trust", () => {
  const rendered = renderStatus({ phase: "untrusted", paused: false });
  assert.match(rendered.text, /shield/);
  assert.equal(rendered.command, "workbench.trust.manage");
});
