// Compile contracts/src/*.sol (and contracts/test/*.sol) offline with solc-js into
// contracts/artifacts/<Name>.json: abi, bytecode, deployedBytecode, compiler settings and the sha256
// of the sources used. `node contracts/build.mjs --check` compiles in memory and exits 1 when the
// committed artifacts differ from what the sources produce.
//
// solc-js comes from the project-local tools folder (make setup) or LORAMESH_SOLC_JS.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = dirname(here);
// Must match the hardfork devnet/anvil.py launches anvil with.
export const EVM_VERSION = "cancun";
const SOURCE_DIRS = ["src", "test"];

function loadSolc() {
  const dir = process.env.LORAMESH_SOLC_JS || join(root, ".tools", "node_modules", "solc");
  if (!existsSync(join(dir, "package.json"))) {
    console.error(`solc-js not found at ${dir}: run make setup`);
    process.exit(2);
  }
  return createRequire(join(dir, "package.json"))(dir);
}

function readSources() {
  const sources = {};
  for (const sub of SOURCE_DIRS) {
    const dir = join(here, sub);
    if (!existsSync(dir)) continue;
    for (const name of readdirSync(dir).sort()) {
      if (!name.endsWith(".sol")) continue;
      const path = join(dir, name);
      sources[relative(here, path)] = { content: readFileSync(path, "utf8") };
    }
  }
  return sources;
}

function sourcesSha256(sources) {
  const h = createHash("sha256");
  for (const key of Object.keys(sources).sort()) {
    h.update(key + "\0" + sources[key].content + "\0");
  }
  return h.digest("hex");
}

function compile(solc, sources) {
  const input = {
    language: "Solidity",
    sources,
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: { enabled: true, runs: 200 },
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
    },
  };
  const out = JSON.parse(solc.compile(JSON.stringify(input)));
  // 2394: "transient storage can break composability". AttributionLedger keys every transient
  // slot by batch id, and a batch id settles once, so a second call in one transaction cannot alias.
  const shown = (out.errors || []).filter((e) => e.errorCode !== "2394");
  const errors = shown.filter((e) => e.severity === "error");
  for (const e of shown) console.error(e.formattedMessage);
  if (errors.length) process.exit(1);
  const digest = sourcesSha256(sources);
  const artifacts = {};
  for (const [sourceName, contracts] of Object.entries(out.contracts)) {
    for (const [name, c] of Object.entries(contracts)) {
      artifacts[name] = {
        contractName: name,
        sourceName,
        abi: c.abi,
        bytecode: "0x" + c.evm.bytecode.object,
        deployedBytecode: "0x" + c.evm.deployedBytecode.object,
        compiler: { solc: solc.version(), evmVersion: EVM_VERSION, optimizerRuns: 200 },
        sourcesSha256: digest,
      };
    }
  }
  return artifacts;
}

const check = process.argv.includes("--check");
const artifacts = compile(loadSolc(), readSources());
const outDir = join(here, "artifacts");
let stale = [];
for (const [name, art] of Object.entries(artifacts)) {
  const text = JSON.stringify(art, null, 2) + "\n";
  const path = join(outDir, `${name}.json`);
  if (check) {
    if (!existsSync(path) || readFileSync(path, "utf8") !== text) stale.push(name);
  } else {
    mkdirSync(outDir, { recursive: true });
    writeFileSync(path, text);
  }
}
if (check) {
  const committed = existsSync(outDir) ? readdirSync(outDir).filter((f) => f.endsWith(".json")) : [];
  for (const f of committed) if (!(f.replace(/\.json$/, "") in artifacts)) stale.push(f);
  if (stale.length) {
    console.error(`artifacts do not match sources: ${stale.join(", ")} (run: node contracts/build.mjs)`);
    process.exit(1);
  }
  console.log("artifacts match sources");
} else {
  console.log(`wrote ${Object.keys(artifacts).length} artifacts to ${relative(root, outDir)}`);
}
