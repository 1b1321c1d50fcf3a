//! Request admission and protocol translation: client bodies parsed, guarded, estimated
//! and translated to every upstream protocol; the same bytes decoded as every upstream's
//! answer, whole and streamed. Any panic is a finding.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&selector, body)) = data.split_first() else {
            return;
        };
        onetoken_gateway::fuzzing::admit_and_translate_request(selector, body);
        onetoken_gateway::fuzzing::translate_reply(selector, body);
    });
}
