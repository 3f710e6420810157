import * as assert from "node:assert/strict";
import { test } from "node:test";
import { LaunchError, serverLaunch, serverSettings } from "../../src/settings";

const reader = (values: Record<string, unknown>) => ({ get: <T>(key: string) => values[key] as T | undefined });

test("unset settings take package.json's defaults", () => {
  assert.deepEqual(serverSettings(reader({})), {
    model: "",
    endpoint: "",
    endpointKind: "auto",
    device: "auto",
    dtype: "auto",
    speculation: true,
    attention: "auto",
    linear: "auto",
    decodeStep: "off",
    kvDtype: "auto",
    maxNewTokens: 64,
    temperature: 0,
    contextTokens: 1536,
    debounceMs: 75,
    debounceMinMs: 0,
    anticipate: true,
    chatModel: "",
    chatMaxNewTokens: 512,
    enabled: true,
  });
});

test("set values are passed on under the protocol's names", () => {
  const settings = serverSettings(
    reader({ model: " /models/starcoder2-3b ", endpoint: " http://gpu-box:8000 ", endpointKind: "vllm", device: "cuda:1", dtype: "bfloat16", maxNewTokens: 32, temperature: 0.2, chatModel: "zephyr", chatMaxNewTokens: 200, enabled: false, decodeStep: "cuda-graph", kvDtype: "float16", speculation: false }),
  );
  assert.equal(settings.model, "/models/starcoder2-3b");
  assert.equal(settings.endpoint, "http://gpu-box:8000");
  assert.equal(settings.endpointKind, "vllm");
  assert.equal(settings.device, "cuda:1");
  assert.equal(settings.dtype, "bfloat16");
  assert.equal(settings.maxNewTokens, 32);
  assert.equal(settings.temperature, 0.2);
  assert.equal(settings.chatModel, "zephyr");
  assert.equal(settings.chatMaxNewTokens, 200);
  assert.equal(settings.enabled, false);
  assert.equal(settings.decodeStep, "cuda-graph");
  assert.equal(settings.kvDtype, "float16");
  assert.equal(settings.speculation, false);
});

test("values of the wrong type fall back to the default", () => {
  const settings = serverSettings(reader({ maxNewTokens: "many", temperature: Number.NaN, debounceMs: 1.5, enabled: "yes", model: 3, chatMaxNewTokens: 2.5 }));
  assert.equal(settings.maxNewTokens, 64);
  assert.equal(settings.temperature, 0);
  assert.equal(settings.debounceMs, 75);
  assert.equal(settings.chatMaxNewTokens, 512);
  assert.equal(settings.enabled, true);
  assert.equal(settings.model, "");
});

test("the default launch is stablelm-lsp --stdio", () => {
  assert.deepEqual(serverLaunch(reader({})), { command: "stablelm-lsp", args: ["--stdio"] });
});

test("a custom server command keeps its arguments and expands ~", () => {
  const launch = serverLaunch(reader({ serverCommand: ["~/venv/bin/stablelm-lsp", "--stdio", "--log-file", "/tmp/x.log"] }), "/home/u");
  assert.deepEqual(launch, { command: "/home/u/venv/bin/stablelm-lsp", args: ["--stdio", "--log-file", "/tmp/x.log"] });
});

test("pythonPath runs the package as a module and wins over serverCommand", () => {
  const launch = serverLaunch(reader({ pythonPath: "~/.venv/bin/python", serverCommand: ["other"] }), "/home/u");
  assert.deepEqual(launch, { command: "/home/u/.venv/bin/python", args: ["-m", "stablelm_lsp.lsp", "--stdio"] });
});

test("an empty server command is an error that names the setting", () => {
  assert.throws(() => serverLaunch(reader({ serverCommand: [] })), (error: Error) => error instanceof LaunchError && /stablelm\.serverCommand/.test(error.message));
  assert.throws(() => serverLaunch(reader({ serverCommand: ["  "] })), LaunchError);
});

test("a server command that is not a list of strings falls back to the default", () => {
  assert.deepEqual(serverLaunch(reader({ serverCommand: "stablelm-lsp --stdio" })), { command: "stablelm-lsp", args: ["--stdio"] });
});
