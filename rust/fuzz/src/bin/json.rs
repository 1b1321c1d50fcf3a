//! Request admission and protocol translation: client bodies parsed, guarded, estimated
//! and translated to every upstream protocol; the same bytes decoded as every upstream's
//! answer, whole and streamed. Any panic is a finding.

fn main() {
    // Build the tokenizer tables once, before the fork server starts, rather than in
    // every forked child (which AFL would see as slow and unstable runs).
    onetoken_gateway::tokens::warm_up();
    afl::fuzz!(|data: &[u8]| {
        let Some((&selector, body)) = data.split_first() else {
            return;
        };
        onetoken_gateway::fuzzing::admit_and_translate_request(selector, body);
        onetoken_gateway::fuzzing::translate_reply(selector, body);
    });
}
