// Parses an AsyncAPI document with the AsyncAPI project's own parser and
// exits non-zero when it reports any diagnostic of severity error.
// Usage: node validate.mjs <document>
import { readFile } from 'node:fs/promises';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const file = process.argv[2];
if (!file) {
  console.error('usage: node validate.mjs <asyncapi document>');
  process.exit(2);
}

const severityName = Object.fromEntries(Object.entries(DiagnosticSeverity).map(([k, v]) => [v, k.toLowerCase()]));
const source = await readFile(file, 'utf8');
const { document, diagnostics } = await new Parser().parse(source, { source: file });

for (const d of diagnostics) {
  const where = d.path && d.path.length ? d.path.join('.') : '(document)';
  console.log(`${severityName[d.severity] ?? d.severity} ${d.code}: ${d.message} at ${where}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (errors.length > 0 || !document) {
  console.error(`${file}: INVALID, ${errors.length} error(s)`);
  process.exit(1);
}
const count = (c) => (c ? c.all().length : 0);
console.log(
  `${file}: valid AsyncAPI ${document.version()}: ${count(document.allMessages())} messages, ` +
    `${count(document.allChannels())} channels, ${count(document.allOperations())} operations, ` +
    `${diagnostics.length} diagnostic(s) below error`,
);
