// Drives pacslab's FHIR API with real third-party clients (run by tests/api/test_fhir_js_clients.py):
//  * fhir-kit-client pages through every searchable resource type with _count=2,
//    following the server's `next` links, and collects every id;
//  * the `fhir` package (FHIR.js, R4 profiles) validates every Bundle page, every
//    resource in it, the CapabilityStatement, an Endpoint and an OperationOutcome.
// Usage: node fhir_paging.mjs <fhir base URL> <bearer token>; prints one JSON report.
import { createRequire } from 'node:module';
import { Client } from 'fhir-kit-client';

const require = createRequire(import.meta.url);
const { Fhir } = require('fhir');

const [baseUrl, token] = process.argv.slice(2);
const client = new Client({ baseUrl, bearerToken: token });
const fhir = new Fhir();
const types = ['Patient', 'ImagingStudy', 'ServiceRequest', 'Observation', 'DiagnosticReport',
  'AuditEvent'];
const report = { ids: {}, totals: {}, pages: {}, invalid: [], validated: {} };

function check(what, resource) {
  const result = fhir.validate(resource, { errorOnUnexpected: true });
  const errors = (result.messages || []).filter((m) => m.severity === 'error');
  report.validated[resource.resourceType] = (report.validated[resource.resourceType] || 0) + 1;
  if (!result.valid || errors.length) {
    report.invalid.push({ what, messages: errors.slice(0, 5) });
  }
}

for (const resourceType of types) {
  const ids = [];
  let pages = 0;
  let bundle = await client.search({ resourceType, searchParams: { _count: 2 } });
  report.totals[resourceType] = bundle.total;
  while (bundle) {
    pages += 1;
    check(`${resourceType} page ${pages}`, bundle);
    for (const entry of bundle.entry || []) {
      ids.push(entry.resource.id);
      check(`${resourceType}/${entry.resource.id}`, entry.resource);
    }
    if (pages > 1000) throw new Error('no end of pages');
    bundle = await client.nextPage({ bundle });
  }
  report.ids[resourceType] = ids;
  report.pages[resourceType] = pages;
}

check('CapabilityStatement', await client.capabilityStatement());
check('Endpoint', await client.read({ resourceType: 'Endpoint', id: 'dicomweb' }));
try {
  await client.search({ resourceType: 'Patient', searchParams: { 'no-such-param': 'x' } });
  report.invalid.push({ what: 'unknown parameter', messages: ['accepted'] });
} catch (error) {
  const outcome = error.response && error.response.data;
  report.outcomeStatus = error.response && error.response.status;
  check('OperationOutcome', outcome);
}
// Negative control: the validator does flag an invalid resource.
report.control = fhir.validate({ resourceType: 'Patient', gender: 'bogus' }).valid;
process.stdout.write(JSON.stringify(report));
